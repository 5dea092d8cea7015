"""Load generators, summaries and app setup the HTTP benchmarks share (a helper of the scripts beside it).

- `closed_loop`: N clients, each sending its next request when its last one answered;
- `open_loop`: requests sent at given times whatever the answers (Poisson arrivals), as real
  traffic does: the latency it measures includes waiting for a server that has fallen behind.
"""

import asyncio
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional


def run_header(benchmark: str) -> dict[str, Any]:
    """What every report starts with: the script, date, exact command and machine."""
    import torch

    return {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "gpus": torch.cuda.device_count()},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(latencies: list[float], wall_s: float) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "req_per_s": round(len(latencies) / wall_s, 3),
        "p50_s": round(percentile(latencies, 50), 4),
        "p95_s": round(percentile(latencies, 95), 4),
        "p99_s": round(percentile(latencies, 99), 4),
        "mean_s": round(statistics.fmean(latencies), 4),
    }


def server_timing(header: str) -> dict[str, float]:
    """`queue;dur=1.0, run;dur=2.0, ...` -> {"queue": 0.001, "run": 0.002, ...} in seconds."""
    return {name.strip(): float(ms) / 1e3 for name, ms in (part.split(";dur=") for part in header.split(","))}


#: One answered request: its body, its latency, and the response.
Answer = tuple[dict, float, Any]


async def closed_loop(base_url: str, path: str, concurrency: int, bodies: Iterable[dict]) -> tuple[list[Answer], float]:
    """`concurrency` clients share `bodies`, each posting the next when its last one answered."""
    import httpx

    answers: list[Answer] = []
    remaining = iter(bodies)

    async def client(http: "httpx.AsyncClient") -> None:
        for body in remaining:
            started = time.perf_counter()
            response = await http.post(path, json=body)
            answers.append((body, time.perf_counter() - started, response))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=3600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return answers, time.perf_counter() - started


async def open_loop(base_url: str, path: str, schedule: list[tuple[float, dict]]) -> tuple[list[Answer], float]:
    """Post each body at its time (seconds from the start), whatever came back before."""
    import httpx

    answers: list[Answer] = []

    async def send(http: "httpx.AsyncClient", at: float, body: dict, start: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        response = await http.post(path, json=body)
        answers.append((body, time.perf_counter() - sent, response))

    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(send(http, at, body, start) for at, body in schedule))
        return answers, time.perf_counter() - start


def poisson_schedule(rate_per_s: float, count: int, make_body: Callable[[int], dict], seed: int = 0) -> list[tuple[float, dict]]:
    """`count` arrivals of a Poisson process at `rate_per_s` (exponential gaps, seeded)."""
    import random

    rng = random.Random(seed)
    at, schedule = 0.0, []
    for index in range(count):
        at += rng.expovariate(rate_per_s)
        schedule.append((at, make_body(index)))
    return schedule


def add_engine_arguments(parser: Any, shared_by: str) -> None:
    """The flags of the scripts that serve two engine deployments (the base and `shared_by`) on one host."""
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--engine-cpus", type=float, default=1)
    parser.add_argument("--engine-gpus", type=float, default=0, help=f"GPUs of each replica (0.5: the base and {shared_by} share one)")
    parser.add_argument("--ray-cpus", type=int, default=3)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", type=Path, required=True)


def two_engine_app(args: Any, model: dict, *, controlnets: Optional[dict] = None, refiner: Optional[dict] = None) -> dict:
    """App args of the base and one more engine deployment, each replica placed as the flags say;
    no LoRA slots (no part of these comparisons) and nothing else deployed."""
    engine = {"num_replicas": 1, "num_cpus": args.engine_cpus, "num_gpus": args.engine_gpus, "max_queued_requests": -1}
    return {
        "model": model,
        "batching": {"max_batch_size": args.max_batch_size},
        "engine": engine,
        "ingress": {"num_replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 4096, "max_queued_requests": -1},
        "state_dir": str(args.out / "state"),
        "limits": {"max_loras": 0},
        "controlnets": {variant: {**config, "engine": engine} for variant, config in (controlnets or {}).items()},
        "refiner": {**refiner, "engine": engine} if refiner else False,
    }


@contextlib.contextmanager
def serving(args: Any, app_args: dict) -> Iterator[float]:
    """A local Ray cluster serving `app_args` on `--port` until the block ends; yields the seconds
    the app took to become ready."""
    import ray
    from ray import serve

    from serve_app.builder import build_app

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        started = time.perf_counter()
        serve.run(build_app(app_args), name="sdxl", route_prefix="/")
        yield round(time.perf_counter() - started, 1)
    finally:
        serve.shutdown()
        ray.shutdown()
