"""Serving overhead and batching gain: the Serve app over HTTP vs. calling the pipeline directly.

    python benchmarks/bench_http.py --out bench-out/          # tiny model, CPU, a few minutes
    python benchmarks/bench_http.py --skip-direct --engine-gpus 1 --size 1024 --steps 30 \
        --model baseline='{"source": "sdxl-arch", "device": "cuda", "dtype": "float16"}' \
        --model optimized='{"source": "sdxl-arch", "device": "cuda", "optimize": {"fuse_qkv": true}}' \
        --model 'two={"model": {"source": "sdxl-arch", "device": "cuda"}, "replicas": 2, "concurrency": [32]}' \
        --concurrency 1,16 --out $OUT

First the plain pipeline is called in this process, one request at a time (unless --skip-direct);
then, for each --model (in order, in the same run), the Ray Serve app is started and driven over
HTTP by closed-loop clients at each concurrency. A --model is `label=JSON`: a model spec
(configs/model_spec.py), or `{"model": spec, ...}` with any of `replicas` (engine replicas, each
with --engine-gpus), `max_batch_size`, `batch_wait_s`, `scheduling` and `concurrency` overriding
the flags for that run, and `request`: fields every request body of that run adds (e.g.
`{"deep_cache_interval": 3}` with a spec whose `optimize.deep_cache` is on). Batch sizes come
from each response's `X-Batch-Size` header (the most requests that shared a UNet forward with
it), so they count every replica.
Prints a table and writes `bench_http.json` into --out.
"""

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from load import closed_loop, run_header, server_timing, summary

os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def bench_direct(spec_raw: dict, size: int, steps: int, requests: int) -> dict:
    """The baseline: the plain pipeline, one request after another, no serving layer."""
    import torch
    from pydantic import TypeAdapter

    from configs.model_spec import ModelSpec
    from deployments.pipelines import load_pipeline

    spec = TypeAdapter(ModelSpec).validate_python(spec_raw)
    pipe = load_pipeline(spec)
    args = dict(prompt="a red circle", width=size, height=size, num_inference_steps=steps, output_type="np")
    pipe(generator=torch.Generator().manual_seed(0), **args)  # warm-up
    latencies = []
    started = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        pipe(generator=torch.Generator().manual_seed(i), **args)
        latencies.append(time.perf_counter() - t0)
    result = summary(latencies, time.perf_counter() - started)
    del pipe
    return result


#: Columns of the latency split in the printed table: (mean_split key, width).
SPLIT_COLUMNS = (("decode_s", 10), ("queue_s", 9), ("run_s", 8), ("encode_s", 10), ("rest_s", 8))


def _run_settings(args, raw: dict) -> tuple[dict, dict]:
    """Split a --model JSON into the model spec and this run's serving settings."""
    if "model" not in raw:
        raw = {"model": raw}
    unknown = set(raw) - {"model", "replicas", "max_batch_size", "batch_wait_s", "scheduling", "concurrency", "request"}
    if unknown:
        raise SystemExit(f"--model: unknown keys {sorted(unknown)}")
    settings = {
        "replicas": raw.get("replicas", 1),
        "max_batch_size": raw.get("max_batch_size", args.max_batch_size),
        "batch_wait_s": raw.get("batch_wait_s", args.batch_wait_s),
        "scheduling": raw.get("scheduling", args.scheduling),
        "concurrency": raw.get("concurrency", args.concurrency),
        "request": raw.get("request", {}),
    }
    return raw["model"], settings


def bench_http(args, label: str, spec_raw: dict, settings: dict) -> list[dict]:
    from ray import serve

    from serve_app.builder import build_app

    app_args = {
        "model": spec_raw,
        "batching": {
            "max_batch_size": settings["max_batch_size"],
            "batch_wait_timeout_s": settings["batch_wait_s"],
            "scheduling": settings["scheduling"],
        },
        "engine": {"num_replicas": settings["replicas"], "num_cpus": args.engine_cpus, "num_gpus": args.engine_gpus},
        "ingress": {"num_replicas": 1, "num_cpus": 0.5},
        # The base engine only: no variant or refiner deployment taking CPUs or a GPU (the tiny
        # model's default refiner left the ingress unscheduled on a 3-CPU cluster).
        "controlnets": {},
        "refiner": False,
    }
    started, started_at = time.perf_counter(), time.time()
    serve.run(build_app(app_args), name="sdxl", route_prefix="/")
    ready_s = time.perf_counter() - started
    # One replica's start: load and warm-up seconds, and whether its compile came from the cache.
    engine = serve.get_deployment_handle("SDXLBase", app_name="sdxl")
    info = engine.model_info.remote().result()
    # Its timed call costs decide how it splits a step's rows into calls ("Compiled batch shapes").
    start = {name: info[name] for name in ("load_s", "warmup_s", "compile_cache", "unet_call_s", "decode_call_s", "unet_call_rounds_s")}
    # Where the time to ready went: before the replica's constructor (placement, the worker
    # process, imports), in it (load, warm-up, the rest of the constructor), after it.
    start["before_constructor_s"] = round(info["started_at"] - started_at, 3)
    start["constructor_s"] = info["start_s"]
    start["after_constructor_s"] = round(ready_s - start["before_constructor_s"] - info["start_s"], 3)
    if "profile" in info:  # the spec's optimize.profile_warmup: one call per bucket, profiled
        start["profile"] = info["profile"]
    print(f"  {label} ready in {ready_s:.1f} s: { {k: v for k, v in start.items() if k != 'profile'} }", flush=True)
    base_url = f"http://127.0.0.1:{args.port}"
    body = {"prompt": "a red circle", "width": args.size, "height": args.size, "num_inference_steps": args.steps, **settings["request"]}
    rows = []
    try:
        warm = 2 * settings["replicas"]
        asyncio.run(closed_loop(base_url, "/v1/txt2img", warm, [{**body, "seed": i} for i in range(2 * warm)]))
        for concurrency in settings["concurrency"]:
            total = max(args.requests, concurrency * args.rounds)
            bodies = [{**body, "seed": i} for i in range(total)]
            before = engine.stats.remote().result()
            answers, wall_s = asyncio.run(closed_loop(base_url, "/v1/txt2img", concurrency, bodies))
            after = engine.stats.remote().result()  # one replica's (of several: whichever answered)
            for _, _, response in answers:
                response.raise_for_status()
            latencies = [latency for _, latency, _ in answers]
            batch_sizes = [int(response.headers["x-batch-size"]) for _, _, response in answers]
            timings = [server_timing(response.headers["server-timing"]) for _, _, response in answers]
            run_summary = summary(latencies, wall_s)
            # Where a request's time went (Server-Timing means): reading the body, waiting to run,
            # the engine running its image, encoding; they add up to the ingress `total`, and the
            # rest of the client's latency is the proxy and transfer.
            split = {f"{name}_s": round(statistics.fmean(t[name] for t in timings), 4) for name in timings[0] if name != "total"}
            split["rest_s"] = round(statistics.fmean(latencies) - sum(split.values()), 4)
            rows.append(
                {
                    "mode": label,
                    "ready_s": round(ready_s, 1),
                    "replica_start": start,
                    "replicas": settings["replicas"],
                    "max_batch_size": settings["max_batch_size"],
                    "batch_wait_s": settings["batch_wait_s"],
                    "scheduling": settings["scheduling"],
                    "request": settings["request"],
                    "concurrency": concurrency,
                    **run_summary,
                    "req_per_s_per_replica": round(run_summary["req_per_s"] / settings["replicas"], 3),
                    # X-Batch-Size: the most requests that shared one UNet forward with a request.
                    "mean_batch": round(statistics.fmean(batch_sizes), 2),
                    "max_batch": max(batch_sizes),
                    "mean_split": split,
                    # What the engine ran meanwhile: forwards, calls, rows a call, rows left a step.
                    "engine": {name: round(after[name] - before[name], 4) for name in _ENGINE_COUNTS},
                    # cudaMalloc/cudaFree calls and allocation retries meanwhile (GPU engines):
                    # steady serving should add none.
                    "cuda_allocator": {
                        name: count - before["cuda_allocator"][name] for name, count in after.get("cuda_allocator", {}).items()
                    },
                    # The replica's garbage collections meanwhile (every thread waits out each).
                    "gc": {
                        name: round(after["gc"][name] - before["gc"][name], 4)
                        for name in ("collections", "full_collections", "seconds", "full_seconds")
                    },
                    # CUDA graph captures and replays meanwhile (`optimize.cuda_graphs`).
                    "cuda_graphs": {
                        name: count - before["cuda_graphs"][name] for name, count in after.get("cuda_graphs", {}).items()
                    },
                    # The UNet buckets' prices after the run, and how many served calls priced each.
                    "unet_call_s": after.get("unet_call_s"),
                    "unet_calls_priced": after.get("unet_calls_priced"),
                }
            )
            print(f"  {label} concurrency {concurrency}: {rows[-1]['req_per_s']} req/s", flush=True)
    finally:
        serve.delete("sdxl")
    return rows


_ENGINE_COUNTS = (
    "forwards", "forward_s", "encode_s", "row_steps", "unet_calls", "shallow_unet_calls", "unet_rows", "padded_unet_rows",
    "deferred_row_steps", "phase_waits",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        action="append",
        help="label=JSON: a model spec, or {model, replicas, max_batch_size, batch_wait_s, scheduling, concurrency}; "
        "repeat to compare in one run. Default: http={tiny}",
    )
    parser.add_argument("--skip-direct", action="store_true", help="no in-process baseline (saves GPU time)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement (at least --rounds per client)")
    parser.add_argument("--rounds", type=int, default=3, help="requests each client sends, at least")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-s", type=float, default=0.05, help="the request scheduling's batch window")
    parser.add_argument("--scheduling", choices=["step", "request"], default="step")
    parser.add_argument("--engine-cpus", type=float, default=2, help="CPUs of the engine replica (torch threads)")
    parser.add_argument("--engine-gpus", type=float, default=0, help="GPUs of each engine replica")
    parser.add_argument("--ray-cpus", type=int, default=3, help="logical CPUs given to the local Ray cluster")
    parser.add_argument("--port", type=int, default=8123, help="HTTP port of the Serve proxy (two runs on one host need two)")
    parser.add_argument("--out", type=Path, required=True, help="folder for bench_http.json")
    args = parser.parse_args()
    models = [m.split("=", 1) for m in (args.model or ['http={"source": "tiny"}'])]
    runs = {label: _run_settings(args, json.loads(raw)) for label, raw in models}

    import ray
    from ray import serve

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        **run_header("bench_http"),
        "settings": {"runs": {label: {"model": spec, **settings} for label, (spec, settings) in runs.items()},
                     "size": args.size, "steps": args.steps, "engine_cpus": args.engine_cpus, "engine_gpus": args.engine_gpus},
        "rows": [],
    }
    rows = report["rows"]

    def save() -> None:  # after every run, so a run cut short keeps what it measured
        (args.out / "bench_http.json").write_text(json.dumps(report, indent=2))

    if not args.skip_direct:
        first, _ = next(iter(runs.values()))
        rows.append({"mode": "direct", "concurrency": 1, **bench_direct(first, args.size, args.steps, args.requests)})
        save()
    # Every visible GPU (CUDA_VISIBLE_DEVICES narrows it): runs with several replicas need them.
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        for label, (spec_raw, settings) in runs.items():
            rows.extend(bench_http(args, label, spec_raw, settings))
            save()
    finally:
        serve.shutdown()
        ray.shutdown()

    header = (
        f"{'mode':<14}{'repl':>5}{'mbs':>5}{'wait s':>8}{'conc':>5}{'reqs':>6}{'req/s':>9}{'/replica':>9}"
        f"{'p50 s':>9}{'p95 s':>9}{'p99 s':>9}{'mean batch':>12}{'max batch':>11}"
        + "".join(f"{key.replace('_s', ' s'):>{width}}" for key, width in SPLIT_COLUMNS)
    )
    print(header)
    for row in rows:
        split = row.get("mean_split", {})
        print(
            f"{row['mode']:<14}{row.get('replicas', '-')!s:>5}{row.get('max_batch_size', '-')!s:>5}"
            f"{row.get('batch_wait_s', '-')!s:>8}{row['concurrency']:>5}{row['requests']:>6}{row['req_per_s']:>9.2f}"
            f"{row.get('req_per_s_per_replica', row['req_per_s']):>9.2f}{row['p50_s']:>9.3f}{row['p95_s']:>9.3f}"
            f"{row['p99_s']:>9.3f}{row.get('mean_batch', 1):>12}{row.get('max_batch', 1):>11}"
            + "".join(f"{split.get(k, float('nan')):>{w}.3f}" for k, w in SPLIT_COLUMNS)
        )
    print(f"wrote {args.out / 'bench_http.json'}")


if __name__ == "__main__":
    main()
