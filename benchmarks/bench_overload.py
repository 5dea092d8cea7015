"""Back-pressure and memory over HTTP on a local cluster (loopback only, bounded): bursts past
capacity, then a long mixed load.

    python benchmarks/bench_overload.py --out bench-out/overload      # CPU, the tiny model
    python benchmarks/bench_overload.py --parts soak --model "$(sdxl-arch spec JSON)" --engine-gpus 0.3 \
        --size 1024 --steps 20 --loras 3 --out $OUT                    # GPU (gpu_suite.sh soak)

1. `burst`: one app with tight bounds (engine batch 2, 2 requests waiting per caller, ingress 10
   ongoing + 4 queued at the proxy); bursts of --bursts simultaneous 40-step requests: how many
   are admitted (200) and refused (503 with Retry-After), how fast a refusal comes, how long the
   admitted take, and the resident memory of every Ray worker process after each burst.
2. `soak`: a base, ControlNet variants and the refiner (the tiny model's default graph; with
   --model another architecture: its `sdxl-arch` canny variant and refiner, and --loras random
   LoRAs written for it) under --soak requests at 4 clients, mixing plain, LoRA (sets in turn, so
   the adapter cache loads and evicts), ControlNet and refined requests; each replica's resident
   memory, and on a GPU each engine's torch memory (allocated, reserved), sampled every --every
   requests: growth from the first sample to the last says whether memory stays flat.
Prints a table and writes `bench_overload.json` into --out after each part.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load import closed_loop, percentile, png_b64, random_loras, run_header  # noqa: E402

os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _worker_rss_mib() -> dict[str, float]:
    """Resident memory of each Ray actor process of this machine, by its title (`ray::Class`)."""
    import psutil

    found: dict[str, float] = {}
    for process in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::") and process.info["memory_info"] is not None:
            name = title.split()[0]
            found[name] = round(found.get(name, 0.0) + process.info["memory_info"].rss / 2**20, 1)
    return found


async def _burst(url: str, count: int) -> list[tuple[int, float]]:
    import httpx

    body = {"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 40}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=count)) as http:

        async def one() -> tuple[int, float]:
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/txt2img", json=body)
            return response.status_code, time.perf_counter() - started

        return await asyncio.gather(*(one() for _ in range(count)))


def burst(args, serve, build_app, base_url: str) -> list[dict]:
    app_args = {
        "state_dir": str(args.out / "state-burst"),
        "batching": {"max_batch_size": 2},
        "engine": {"num_cpus": 0, "max_queued_requests": 2},
        "ingress": {"num_cpus": 0, "max_ongoing_requests": 10, "max_queued_requests": 4},
        "jobs": {"num_cpus": 0},
        "controlnets": {},
        "refiner": False,
    }
    serve.run(build_app(app_args), name="burst", route_prefix="/burst")
    url = f"{base_url}/burst"
    rows = []
    try:
        asyncio.run(_burst(url, 2))  # warm-up
        for count in args.bursts:
            started = time.perf_counter()
            answers = asyncio.run(_burst(url, count))
            wall = time.perf_counter() - started
            ok = [s for code, s in answers if code == 200]
            refused = [s for code, s in answers if code == 503]
            row = {
                "burst": count, "ok": len(ok), "refused_503": len(refused), "other": len(answers) - len(ok) - len(refused),
                "refusal_p50_s": round(percentile(refused, 50), 4) if refused else None,
                "refusal_max_s": round(max(refused), 4) if refused else None,
                "ok_p50_s": round(percentile(ok, 50), 3) if ok else None, "wall_s": round(wall, 2),
                "rss_mib": _worker_rss_mib(),
            }
            rows.append(row)
            print({k: v for k, v in row.items() if k != "rss_mib"}, flush=True)
    finally:
        serve.delete("burst")
    return rows


def _mixed(i: int, control: str, loras: list[str], controlnets: list[str], args) -> dict:
    """Request `i` of the soak: plain, a LoRA set (names and weights in turn), each ControlNet, refined."""
    body = {"prompt": "a red circle on a blue background", "seed": i, "num_inference_steps": args.steps, "width": args.size, "height": args.size}
    kinds = ["plain", "lora", "refiner", *controlnets]
    kind = kinds[i % len(kinds)]
    if kind == "lora":
        turn = i // len(kinds)
        body["loras"] = [{"name": loras[turn % len(loras)], "weight": 0.5 + 0.1 * (turn % 3)}]
    elif kind == "refiner":
        body["refiner"] = {}
    elif kind != "plain":
        body["controlnet"] = {"name": kind, "image": control}
    return body


def _soak_app(args) -> tuple[dict, list[str], list[str]]:
    """The soak's app args, its LoRA names and ControlNet names: the tiny default graph (the
    shipped pastel LoRA at three weights), or --model with a sdxl-arch canny variant, a sdxl-arch
    refiner and --loras random LoRAs written into its registry."""
    state = args.out / "state-soak"
    placement = {"num_gpus": args.engine_gpus, "num_cpus": 1}
    if args.model is None:
        return {"state_dir": str(state), "loras": {"cache_size": 8}}, ["pastel"], ["canny", "silhouette"]
    loras = random_loras(state / "loras", args.loras)
    app = {
        "state_dir": str(state), "model": json.loads(args.model), "engine": placement, "loras": {"cache_size": 8},
        "controlnets": {"canny": {"models": {"canny": {"source": "sdxl-arch"}}, "engine": placement}},
        "refiner": {"model": {"source": "sdxl-arch"}, "engine": placement},
    }
    return app, loras, ["canny"]


def _engine_memory(serve) -> dict[str, dict]:
    """Each engine deployment's torch GPU memory (`stats()["gpu_memory_mib"]`; empty on CPU)."""
    status = serve.status().applications["soak"].deployments
    found = {}
    for name in status:
        if name.startswith("SDXL"):
            memory = serve.get_deployment_handle(name, app_name="soak").stats.remote().result().get("gpu_memory_mib")
            if memory:
                found[name] = memory
    return found


def soak(args, serve, build_app, base_url: str) -> dict:
    app, loras, controlnets = _soak_app(args)
    serve.run(build_app(app), name="soak", route_prefix="/soak")
    url = f"{base_url}/soak"
    picture = np.zeros((args.size, args.size, 3), dtype=np.uint8)
    picture[args.size // 4 : 3 * args.size // 4, args.size // 4 : 3 * args.size // 4] = 255
    control = png_b64(picture)
    samples, errors = [], 0
    try:
        for start in range(0, args.soak, args.every):
            bodies = [_mixed(i, control, loras, controlnets, args) for i in range(start, start + args.every)]
            answers, _ = asyncio.run(closed_loop(url, "/v1/txt2img", 4, bodies))
            errors += sum(1 for _, _, response in answers if response.status_code != 200)
            samples.append({"requests": start + args.every, "rss_mib": _worker_rss_mib(), "gpu_mib": _engine_memory(serve)})
            print(samples[-1], flush=True)
    finally:
        serve.delete("soak")
    first, last = samples[0], samples[-1]
    growth = {name: round(last["rss_mib"][name] - mib, 1) for name, mib in first["rss_mib"].items() if name in last["rss_mib"]}
    gpu_growth = {
        name: {kind: round(last["gpu_mib"][name][kind] - mib, 1) for kind, mib in memory.items()}
        for name, memory in first["gpu_mib"].items() if name in last["gpu_mib"]
    }
    return {"requests": args.soak, "errors": errors, "samples": samples, "growth_mib_first_to_last": growth, "gpu_growth_mib_first_to_last": gpu_growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=lambda s: [int(x) for x in s.split(",")], default=[20, 80, 200])
    parser.add_argument("--soak", type=int, default=300, help="requests of the mixed load")
    parser.add_argument("--every", type=int, default=30, help="requests between memory samples")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=["burst", "soak"], help="burst, soak or both")
    parser.add_argument("--model", default=None, help="the soak's base model spec JSON (default: the tiny model's graph)")
    parser.add_argument("--engine-gpus", type=float, default=0.0, help="GPUs of each soak engine deployment")
    parser.add_argument("--size", type=int, default=128, help="the soak's image side")
    parser.add_argument("--steps", type=int, default=6, help="the soak's denoising steps")
    parser.add_argument("--loras", type=int, default=3, help="random LoRAs written for a --model soak")
    parser.add_argument("--ray-cpus", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import ray
    from ray import serve

    from serve_app.builder import build_app

    report = {**run_header("bench_overload"), "settings": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        (args.out / "bench_overload.json").write_text(json.dumps(report, indent=2))

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8125})
    base_url = "http://127.0.0.1:8125"
    try:
        if "burst" in args.parts:
            report["burst"] = burst(args, serve, build_app, base_url)
            save()
        if "soak" in args.parts:
            report["soak"] = soak(args, serve, build_app, base_url)
            save()
    finally:
        serve.shutdown()
        ray.shutdown()
    if "burst" in report:
        print(f"{'burst':>6} {'ok':>4} {'503':>5} {'503 p50 s':>10} {'503 max s':>10} {'ok p50 s':>9} {'wall s':>7}")
        for row in report["burst"]:
            print(f"{row['burst']:>6} {row['ok']:>4} {row['refused_503']:>5} {row['refusal_p50_s']!s:>10} {row['refusal_max_s']!s:>10} "
                  f"{row['ok_p50_s']!s:>9} {row['wall_s']:>7}")
    if "soak" in report:
        soaked = report["soak"]
        print("soak: errors", soaked["errors"], "memory growth (MiB, first sample to last):", soaked["growth_mib_first_to_last"],
              "GPU:", soaked["gpu_growth_mib_first_to_last"])
    print(f"wrote {args.out / 'bench_overload.json'}")


if __name__ == "__main__":
    main()
