"""Step-level vs request-level scheduling of the engine, in one run, over HTTP.

    python benchmarks/bench_scheduling.py --out bench-out/                     # CPU, the tiny model
    python benchmarks/bench_scheduling.py --engine-gpus 1 --size 1024 --steps 30 \
        --model "$(compiled spec JSON)" --out $OUT                             # GPU (gpu_suite.sh scheduling)

The same Serve app is started once per policy (`request` first, then `step`), and each faces:
0. `lone`: one client, four requests one after another: the replica's own service time;
1. `closed`: --clients clients in a closed loop: throughput at saturation and latency;
2. `open`: Poisson arrivals at each of --loads × the capacity the `request` policy measured in
   (1), the same seeded arrival times for both policies;
3. `mixed`: --clients clients in a closed loop where every other request takes --short-steps and
   the others --long-steps: the latency of each kind at saturation;
4. `mixed_open`: the same mix as Poisson arrivals at each of --loads of the capacity in denoising
   steps (the rate scaled by --steps over the mix's mean steps): what a short request waits for
   when the server is not saturated.
Each row records the engine's counters over the workload (requests admitted into a running batch,
rows per UNet forward) and the Server-Timing split. Prints a table, the step/request ratios the
issue's targets are stated in, and writes `bench_scheduling.json` into --out after every workload.
"""

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from load import closed_loop, open_loop, percentile, poisson_schedule, run_header, server_timing, summary

os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")



def _body(args, index: int, steps: int) -> dict:
    return {"prompt": "a red circle", "width": args.size, "height": args.size, "num_inference_steps": steps, "seed": index}


def _row(policy: str, workload: str, answers: list, wall_s: float, before: dict, after: dict, **extra) -> dict:
    ok = [(body, latency, response) for body, latency, response in answers if response.status_code == 200]
    latencies = [latency for _, latency, _ in ok]
    timings = [server_timing(response.headers["server-timing"]) for _, _, response in ok]
    forwards = after["forwards"] - before["forwards"]
    row = {
        "policy": policy,
        "workload": workload,
        **extra,
        **summary(latencies, wall_s),
        "errors": len(answers) - len(ok),
        "mean_batch_size": round(statistics.fmean(int(r.headers["x-batch-size"]) for _, _, r in ok), 2),
        "rows_per_forward_mean": round((after["row_steps"] - before["row_steps"]) / forwards, 2) if forwards else None,
        "admitted_into_running": after["admitted_into_running"] - before["admitted_into_running"],
        # Seconds per forward: whether the GPU ran slower in this workload, not only the queue.
        "forward_ms_mean": round(1000 * (after["forward_s"] - before["forward_s"]) / forwards, 1) if forwards else None,
        "mean_split_s": {name: round(statistics.fmean(t[name] for t in timings), 4) for name in timings[0]},
    }
    by_steps: dict[int, list[float]] = {}
    for body, latency, _ in ok:
        by_steps.setdefault(body["num_inference_steps"], []).append(latency)
    if len(by_steps) > 1:
        row["p50_s_by_steps"] = {steps: round(percentile(values, 50), 4) for steps, values in sorted(by_steps.items())}
    return row


def bench_policy(args, policy: str, spec: dict, capacity: float, report: dict, save) -> float:
    from ray import serve

    from serve_app.builder import build_app

    app_args = {
        "model": spec,
        "batching": {"max_batch_size": args.max_batch_size, "scheduling": policy, "batch_wait_timeout_s": args.batch_wait_s},
        "engine": {"num_replicas": 1, "num_cpus": args.engine_cpus, "num_gpus": args.engine_gpus, "max_queued_requests": -1},
        "ingress": {"num_replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 4096, "max_queued_requests": -1},
        "state_dir": str(args.out / "state"),
        # No LoRA slots: they play no part in the comparison and double a compiled UNet's warm-up.
        "limits": {"max_loras": 0},
        "controlnets": {},  # the base engine only: no variant deployment taking CPUs or a GPU
    }
    started = time.perf_counter()
    serve.run(build_app(app_args), name="sdxl", route_prefix="/")
    engine = serve.get_deployment_handle("SDXLBase", app_name="sdxl")
    report["starts"][policy] = {"ready_s": round(time.perf_counter() - started, 1), **engine.model_info.remote().result()}
    base_url = f"http://127.0.0.1:{args.port}"
    path = "/v1/txt2img"

    def measure(workload: str, run, **extra) -> dict:
        before = engine.stats.remote().result()
        answers, wall_s = asyncio.run(run)
        row = _row(policy, workload, answers, wall_s, before, engine.stats.remote().result(), **extra)
        report["rows"].append(row)
        save()
        print(f"  {policy:<8}{workload:<8}{extra.get('load', ''):>6} {row['req_per_s']:.3f} req/s, p50 {row['p50_s']:.3f} s", flush=True)
        return row

    try:
        asyncio.run(closed_loop(base_url, path, 2, [_body(args, i, args.steps) for i in range(4)]))  # warm-up
        # A lone client's requests, one after another: this replica's own service time, against
        # which the loaded workloads' latencies read (two runs' replicas can differ).
        measure("lone", closed_loop(base_url, path, 1, [_body(args, i, args.steps) for i in range(4)]), clients=1)
        total = args.clients * args.rounds
        closed = measure("closed", closed_loop(base_url, path, args.clients, [_body(args, i, args.steps) for i in range(total)]), clients=args.clients)
        capacity = capacity or closed["req_per_s"]

        def mixed(i: int) -> dict:
            return _body(args, i, args.short_steps if i % 2 else args.long_steps)

        measure("mixed", closed_loop(base_url, path, args.clients, [mixed(i) for i in range(total)]), clients=args.clients)
        # Each load's uniform and mixed open loops together, the lowest load first: a GPU call cut
        # short by its time limit still returns both comparisons at 50%, which the targets name.
        step_ratio = args.steps / ((args.short_steps + args.long_steps) / 2)
        for load in args.loads:
            schedule = poisson_schedule(load * capacity, args.open_requests, lambda i: _body(args, i, args.steps), seed=1)
            measure("open", open_loop(base_url, path, schedule), load=load, rate_per_s=round(load * capacity, 3))
            rate = load * capacity * step_ratio
            schedule = poisson_schedule(rate, args.open_requests, mixed, seed=2)
            measure("mixed_open", open_loop(base_url, path, schedule), load=load, rate_per_s=round(rate, 3))
    finally:
        serve.delete("sdxl")
    return capacity


def _ratios(rows: list[dict]) -> dict:
    """step ÷ request for what the issue's targets name."""
    def pick(policy, workload, load=None):
        return next(r for r in rows if r["policy"] == policy and r["workload"] == workload and r.get("load") == load)

    ratios = {"closed_throughput": round(pick("step", "closed")["req_per_s"] / pick("request", "closed")["req_per_s"], 3)}
    for load in sorted({r["load"] for r in rows if r["workload"] == "open"}):
        ratios[f"open_{load}_p50"] = round(pick("step", "open", load)["p50_s"] / pick("request", "open", load)["p50_s"], 3)
    for workload, load in [("mixed", None)] + [("mixed_open", r["load"]) for r in rows if r["workload"] == "mixed_open" and r["policy"] == "step"]:
        step_p50, request_p50 = pick("step", workload, load)["p50_s_by_steps"], pick("request", workload, load)["p50_s_by_steps"]
        short = min(step_p50)
        ratios[f"{workload}{'' if load is None else f'_{load}'}_short_p50"] = round(step_p50[short] / request_p50[short], 3)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default='{"source": "tiny"}', help="model spec JSON (configs/model_spec.py)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps of the closed and open workloads")
    parser.add_argument("--short-steps", type=int, default=8)
    parser.add_argument("--long-steps", type=int, default=40)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="requests each closed-loop client sends")
    parser.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.9])
    parser.add_argument("--open-requests", type=int, default=64, help="arrivals per open-loop load")
    parser.add_argument("--capacity", type=float, help="req/s the open loops are scaled by (default: measured)")
    parser.add_argument(
        "--policies", type=lambda s: s.split(","), default=["request", "step"],
        help="in this order; the first one's closed loop measures the capacity unless --capacity is given",
    )
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-s", type=float, default=0.1, help="the request policy's batch window")
    parser.add_argument("--engine-cpus", type=float, default=2)
    parser.add_argument("--engine-gpus", type=float, default=0)
    parser.add_argument("--ray-cpus", type=int, default=3)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads(args.model)

    import ray
    from ray import serve

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        **run_header("bench_scheduling"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "starts": {},
        "rows": [],
    }

    def save() -> None:
        (args.out / "bench_scheduling.json").write_text(json.dumps(report, indent=2))

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        capacity = args.capacity
        for policy in args.policies:
            capacity = bench_policy(args, policy, spec, capacity, report, save)
        if set(args.policies) == {"request", "step"}:
            report["step_over_request"] = _ratios(report["rows"])
        save()
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"{'policy':<9}{'workload':<9}{'load':>5}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}{'err':>5}"
          f"{'batch':>7}{'rows/fwd':>9}{'joined':>7}  p50 by steps")
    for row in report["rows"]:
        print(f"{row['policy']:<9}{row['workload']:<9}{row.get('load', ''):>5}{row['req_per_s']:>8.3f}{row['p50_s']:>8.3f}"
              f"{row['p95_s']:>8.3f}{row['p99_s']:>8.3f}{row['errors']:>5}{row['mean_batch_size']:>7}"
              f"{row['rows_per_forward_mean']!s:>9}{row['admitted_into_running']:>7}  {row.get('p50_s_by_steps', '')}")
    print("step / request:", report.get("step_over_request"))
    print(f"wrote {args.out / 'bench_scheduling.json'}")


if __name__ == "__main__":
    main()
