"""Two warm-up profiles side by side (`optimize.profile_warmup`): one UNet call per bucket, kernel
by kernel, e.g. the same engine in a plain process and in a Serve replica.

    python benchmarks/compare_profiles.py IN_PROCESS.json REPLICA.json --rows 16 --out bench-out/

Each file is a `bench_pipeline.py --served --profile-warmup` JSON (its rows' `profile`) or a
`bench_http.py` JSON whose spec had `profile_warmup` (its rows' `replica_start.profile`); the
first row that has one is read. For the bucket of --rows UNet rows: the call's wall and device
seconds in each, then the device kernels (host ops where neither has kernels: a CPU run) by the
larger of their two times, with the ratio second/first. Prints the table and writes
`compare_profiles.json` into --out.
"""

import argparse
import json
from pathlib import Path


def profile_of(path: Path) -> dict:
    """The first warm-up profile in a benchmark's JSON, by UNet rows (as ints)."""
    for row in json.loads(path.read_text())["rows"]:
        profile = row.get("profile") or row.get("replica_start", {}).get("profile")
        if profile:
            return {int(rows): call for rows, call in profile.items()}
    raise SystemExit(f"{path}: no row has a warm-up profile (run with --profile-warmup / optimize.profile_warmup)")


def compare(first: dict, second: dict) -> dict:
    """One bucket's two profiles: totals and the ops of either, matched by name."""
    kind = "kernels" if first["kernels"] or second["kernels"] else "host_ops"
    a = {op["name"]: op for op in first[kind]}
    b = {op["name"]: op for op in second[kind]}
    names = sorted(set(a) | set(b), key=lambda name: -max(a.get(name, {}).get("ms", 0), b.get(name, {}).get("ms", 0)))
    ops = []
    for name in names:
        ms = [a.get(name, {}).get("ms"), b.get(name, {}).get("ms")]
        ratio = round(ms[1] / ms[0], 2) if None not in ms and ms[0] > 0 else None
        ops.append({"name": name, "ms": ms, "calls": [a.get(name, {}).get("calls"), b.get(name, {}).get("calls")], "ratio": ratio})
    return {
        "kind": kind,
        "wall_s": [first["wall_s"], second["wall_s"]],
        "device_s": [first["device_s"], second["device_s"]],
        "ops": ops,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--rows", type=int, default=None, help="UNet rows of the bucket to compare (default: the largest)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    first, second = profile_of(args.first), profile_of(args.second)
    rows = args.rows or max(set(first) & set(second))
    if rows not in first or rows not in second:
        parser.error(f"--rows {rows}: the profiles have buckets {sorted(first)} and {sorted(second)}")
    result = {"first": str(args.first), "second": str(args.second), "rows": rows, **compare(first[rows], second[rows])}
    print(f"{rows} UNet rows: wall {result['wall_s'][0]} s vs {result['wall_s'][1]} s, device {result['device_s'][0]} s vs {result['device_s'][1]} s")
    print(f"{'ms first':>10} {'ms second':>10} {'ratio':>6}  {result['kind'][:-1]}")
    for op in result["ops"]:
        first_ms, second_ms = ("-" if ms is None else f"{ms:.3f}" for ms in op["ms"])
        print(f"{first_ms:>10} {second_ms:>10} {op['ratio'] if op['ratio'] is not None else '-':>6}  {op['name']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare_profiles.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
