"""A ControlNet variant deployment under load, and a base + variant sharing one GPU, over HTTP.

    python benchmarks/bench_controlnet_http.py --out bench-out/                # CPU, the tiny model
    python benchmarks/bench_controlnet_http.py --engine-gpus 0.5 --size 1024 --steps 30 \
        --model "$(spec JSON)" --controlnet '{"source": "sdxl-arch"}' --out $OUT  # GPU (gpu_suite.sh controlnet_http)

One Serve app: the base engine deployment and one ControlNet variant (`canny`), each replica
given --engine-gpus (0.5: both on one GPU, as a small variant may be deployed). Three closed loops
of --clients clients and --requests requests each:
1. `base`: plain txt2img, the variant idle;
2. `controlnet`: every request steered by a canny map, the base idle: the variant's throughput;
3. `both`: the two loads at once, each on its own deployment, sharing the GPU.
Prints a table and writes `bench_controlnet_http.json` into --out after every loop.
"""

import argparse
import asyncio
import base64
import io
import json
import os
import statistics

from load import add_engine_arguments, closed_loop, run_header, serving, summary, two_engine_app

os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def ring_map(size: int) -> str:
    """A canny-style control map as base64 PNG: a white ring on black, off centre."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[:size, :size]
    radius = np.hypot(x - size * 0.62, y - size * 0.4)
    ring = np.abs(radius - size * 0.22) < max(1.0, size / 128)
    buffer = io.BytesIO()
    Image.fromarray((ring * 255).astype(np.uint8)).convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _row(workload: str, answers: list, wall_s: float) -> dict:
    for _, _, response in answers:
        response.raise_for_status()
    return {
        "workload": workload,
        **summary([latency for _, latency, _ in answers], wall_s),
        "mean_batch": round(statistics.fmean(int(r.headers["x-batch-size"]) for _, _, r in answers), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default='{"source": "tiny"}', help="base model spec JSON (configs/model_spec.py)")
    parser.add_argument("--controlnet", default='{"source": "tiny", "map": "canny"}', help="ControlNet spec JSON")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients of each load")
    parser.add_argument("--requests", type=int, default=16, help="requests of each load")
    add_engine_arguments(parser, "the variant")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    app_args = two_engine_app(
        args, json.loads(args.model), controlnets={"canny": {"models": {"canny": json.loads(args.controlnet)}}}
    )
    report = {**run_header("bench_controlnet_http"), "settings": {k: str(v) for k, v in vars(args).items()}, "rows": []}

    def save() -> None:
        (args.out / "bench_controlnet_http.json").write_text(json.dumps(report, indent=2))

    body = {"prompt": "a red circle", "width": args.size, "height": args.size, "num_inference_steps": args.steps}
    steered = {**body, "controlnet": {"name": "canny", "image": ring_map(args.size)}}
    url, path = f"http://127.0.0.1:{args.port}", "/v1/txt2img"

    def bodies(template: dict, count: int) -> list[dict]:
        return [{**template, "seed": i} for i in range(count)]

    with serving(args, app_args) as ready_s:
        report["ready_s"] = ready_s
        for template in (body, steered):  # warm-up: each deployment's first forwards
            asyncio.run(closed_loop(url, path, 2, bodies(template, 4)))
        for workload, template in (("base", body), ("controlnet", steered)):
            report["rows"].append(_row(workload, *asyncio.run(closed_loop(url, path, args.clients, bodies(template, args.requests)))))
            save()

        async def both():
            return await asyncio.gather(
                closed_loop(url, path, args.clients, bodies(body, args.requests)),
                closed_loop(url, path, args.clients, bodies(steered, args.requests)),
            )

        for workload, result in zip(("both:base", "both:controlnet"), asyncio.run(both())):
            report["rows"].append(_row(workload, *result))
        save()

    print(f"ready in {report['ready_s']} s; {args.size}², {args.steps} steps, {args.clients} clients, engine GPUs {args.engine_gpus}")
    print(f"{'workload':<17}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'batch':>7}")
    for row in report["rows"]:
        print(f"{row['workload']:<17}{row['req_per_s']:>8.3f}{row['p50_s']:>8.3f}{row['p95_s']:>8.3f}{row['mean_batch']:>7}")
    print(f"wrote {args.out / 'bench_controlnet_http.json'}")


if __name__ == "__main__":
    main()
