"""Benchmark helpers whose output a reader acts on: `benchmarks/compare_profiles.py`."""

import json

from benchmarks.compare_profiles import compare, main


def _call(wall_s, device_s, kernels):
    return {"wall_s": wall_s, "device_s": device_s, "kernels": [{"name": n, "calls": c, "ms": ms} for n, c, ms in kernels], "host_ops": []}


def test_two_profiles_are_matched_kernel_by_kernel_largest_first():
    in_process = _call(0.28, 0.27, [("gemm", 70, 120.0), ("conv", 40, 80.0), ("flash_fwd", 20, 30.0)])
    replica = _call(0.55, 0.54, [("gemm", 70, 121.0), ("conv", 40, 300.0), ("attn_math", 20, 90.0)])
    result = compare(in_process, replica)
    assert result["kind"] == "kernels" and result["wall_s"] == [0.28, 0.55]
    assert [op["name"] for op in result["ops"]] == ["conv", "gemm", "attn_math", "flash_fwd"]
    conv, _, math, flash = result["ops"]
    assert conv["ratio"] == 3.75 and conv["calls"] == [40, 40]
    assert math["ms"] == [None, 90.0] and math["ratio"] is None  # a kernel only the replica ran
    assert flash["ms"] == [30.0, None]


def test_the_script_reads_a_pipeline_json_and_an_http_json(tmp_path):
    """`bench_pipeline.py` keeps the profile in a row's `profile`, `bench_http.py` in its
    `replica_start`; buckets come back from JSON as strings."""
    call = {**_call(0.1, 0.0, []), "host_ops": [{"name": "aten::mm", "calls": 3, "ms": 2.0}]}
    (tmp_path / "a.json").write_text(json.dumps({"rows": [{"profile": {"2": call, "16": call}}]}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": [{}, {"replica_start": {"profile": {"16": call}}}]}))
    result = main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path)])
    assert result["rows"] == 16 and result["kind"] == "host_ops"  # the bucket both have; no kernels on a CPU
    assert result["ops"] == [{"name": "aten::mm", "ms": [2.0, 2.0], "calls": [3, 3], "ratio": 1.0}]
    assert json.loads((tmp_path / "compare_profiles.json").read_text()) == result
