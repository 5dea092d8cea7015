"""The refiner over HTTP: latency base-only vs refined, throughput with half the requests refined,
and how the base and refiner deployments' replica counts should relate.

    python benchmarks/bench_refiner.py --out bench-out/                        # CPU, the tiny family
    python benchmarks/bench_refiner.py --engine-gpus 0.5 --size 1024 --steps 30 \
        --model "$(spec JSON)" --refiner '{"source": "sdxl-arch"}' --out $OUT  # GPU (gpu_suite.sh refiner)

One Serve app: the base deployment and the refiner deployment, each replica given --engine-gpus
(0.5: both on one GPU). Then:
1. `alone`: one client, --requests base-only and as many refined requests (ensemble at
   --switch-at), taking turns so that clocks and caches warming up weigh on both kinds alike:
   each kind's latency with nothing else running;
2. `half`: --clients clients in a closed loop, every other request refined: throughput, each
   kind's latency, and each deployment's busy seconds (the engines' summed UNet-forward time,
   from their stats): their ratio is the replica ratio that keeps both equally busy.
Prints a table and writes `bench_refiner.json` into --out after every workload.
"""

import argparse
import asyncio
import json
import os
import statistics

from load import add_engine_arguments, closed_loop, percentile, run_header, serving, summary, two_engine_app

os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _by_kind(answers: list) -> dict:
    latencies: dict[str, list[float]] = {}
    for body, latency, response in answers:
        response.raise_for_status()
        latencies.setdefault("refined" if "refiner" in body else "base", []).append(latency)
    return {kind: round(percentile(values, 50), 4) for kind, values in sorted(latencies.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default='{"source": "tiny"}', help="base model spec JSON (configs/model_spec.py)")
    parser.add_argument("--refiner", default='{"source": "tiny"}', help="refiner spec JSON")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--switch-at", type=float, default=0.8)
    parser.add_argument("--requests", type=int, default=6, help="requests of each kind for the latency of one alone")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients of the mixed load")
    parser.add_argument("--rounds", type=int, default=3, help="requests each client sends in the mixed load")
    add_engine_arguments(parser, "the refiner")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    app_args = two_engine_app(args, json.loads(args.model), refiner={"model": json.loads(args.refiner)})
    report = {**run_header("bench_refiner"), "settings": {k: str(v) for k, v in vars(args).items()}, "rows": []}

    def save() -> None:
        (args.out / "bench_refiner.json").write_text(json.dumps(report, indent=2))

    plain = {"prompt": "a red circle", "width": args.size, "height": args.size, "num_inference_steps": args.steps}
    refined = {**plain, "refiner": {"mode": "ensemble", "switch_at": args.switch_at}}
    url, path = f"http://127.0.0.1:{args.port}", "/v1/txt2img"

    with serving(args, app_args) as ready_s:
        from ray import serve

        report["ready_s"] = ready_s
        handles = {role: serve.get_deployment_handle(name, app_name="sdxl") for role, name in (("base", "SDXLBase"), ("refiner", "SDXLRefiner"))}
        asyncio.run(closed_loop(url, path, 2, [{**body, "seed": i} for i, body in enumerate([plain, refined] * 2)]))  # warm-up

        # 1. One request at a time.
        bodies = [{**body, "seed": i} for i in range(args.requests) for body in (plain, refined)]
        answers, _ = asyncio.run(closed_loop(url, path, 1, bodies))
        report["rows"].append({"workload": "alone", "p50_s": _by_kind(answers)})
        save()

        # 2. Half refined under load; each engine's busy time from its forward times.
        def busy() -> dict:
            return {role: handle.stats.remote().result() for role, handle in handles.items()}

        before = busy()
        total = args.clients * args.rounds
        mixed = [{**(refined if i % 2 else plain), "seed": i} for i in range(total)]
        answers, wall_s = asyncio.run(closed_loop(url, path, args.clients, mixed))
        after = busy()
        steps = {role: after[role]["row_steps"] - before[role]["row_steps"] for role in handles}
        forwards = {role: after[role]["forwards"] - before[role]["forwards"] for role in handles}
        busy_s = {role: round(after[role]["forward_s"] - before[role]["forward_s"], 3) for role in handles}
        report["rows"].append(
            {
                "workload": "half",
                **summary([latency for _, latency, _ in answers], wall_s),
                "p50_s": _by_kind(answers),
                "row_steps": steps,
                "forwards": forwards,
                "rows_per_forward": {role: round(steps[role] / forwards[role], 2) if forwards[role] else None for role in handles},
                "busy_s": busy_s,
                # Replicas of the base per refiner replica that keep both equally busy at this mix.
                "base_per_refiner": round(busy_s["base"] / busy_s["refiner"], 2) if busy_s["refiner"] else None,
                "mean_batch": round(statistics.fmean(int(r.headers["x-batch-size"]) for _, _, r in answers), 2),
            }
        )
        save()

    alone, half = report["rows"]
    print(f"ready in {report['ready_s']} s; {args.size}², {args.steps} steps, switch at {args.switch_at}, engine GPUs {args.engine_gpus}")
    print(f"alone: p50 base {alone['p50_s'].get('base')} s, refined {alone['p50_s'].get('refined')} s")
    print(f"half refined, {args.clients} clients: {half['req_per_s']} req/s, p50 {half['p50_s']}, "
          f"row-steps {half['row_steps']}, rows/forward {half['rows_per_forward']}, busy s {half['busy_s']} "
          f"(base replicas per refiner replica: {half['base_per_refiner']})")
    print(f"wrote {args.out / 'bench_refiner.json'}")


if __name__ == "__main__":
    main()
