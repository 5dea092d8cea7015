"""Load generators, summaries and app setup the HTTP benchmarks share (a helper of the scripts beside it).

- `closed_loop`: N clients, each sending its next request when its last one answered;
- `stepped_closed_loop`: the same for set times, the number of clients changing from one period
  to the next (a load step), each request's send time recorded;
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


#: One answered request of a timed load: its body, when it was sent (seconds from the load's
#: start), its latency and the response.
TimedAnswer = tuple[dict, float, float, Any]


async def stepped_closed_loop(
    base_url: str, path: str, levels: list[tuple[float, int]], make_body: Callable[[int], dict]
) -> tuple[list[TimedAnswer], float]:
    """A closed loop whose client count follows `levels`, `(seconds, clients)` in turn: client i
    sends while i is below the current level's count, each request when its last one answered,
    bodies `make_body(0)`, `make_body(1)`, ... in the order they are sent. Nothing is sent after
    the last level ends; the answers still come. Returns the answers and the seconds until the
    last one."""
    import itertools

    import httpx

    ends = list(itertools.accumulate(seconds for seconds, _ in levels))
    peak = max(clients for _, clients in levels)
    numbers = itertools.count()
    answers: list[TimedAnswer] = []

    def clients_at(at: float) -> int:
        return next((clients for end, (_, clients) in zip(ends, levels) if at < end), 0)

    async def client(http: "httpx.AsyncClient", index: int, start: float) -> None:
        while (at := time.perf_counter() - start) < ends[-1]:
            if index >= clients_at(at):
                await asyncio.sleep(0.05)
                continue
            body = make_body(next(numbers))
            response = await http.post(path, json=body)
            answers.append((body, at, time.perf_counter() - start - at, response))

    limits = httpx.Limits(max_connections=peak)
    async with httpx.AsyncClient(base_url=base_url, timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, index, start) for index in range(peak)))
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
def cluster(args: Any) -> Iterator[None]:
    """A local Ray cluster (`--ray-cpus` logical CPUs, every visible GPU) with Serve's proxy on
    `--port`, shut down when the block ends, however it ends."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def serving(args: Any, app_args: dict) -> Iterator[float]:
    """A local Ray cluster serving `app_args` on `--port` until the block ends; yields the seconds
    the app took to become ready."""
    from ray import serve

    from serve_app.builder import build_app

    with cluster(args):
        started = time.perf_counter()
        serve.run(build_app(app_args), name="sdxl", route_prefix="/")
        yield round(time.perf_counter() - started, 1)


def png_b64(pixels: Any) -> str:
    """A uint8 (H, W, 3) array as base64 PNG: an image field of a JSON request."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def random_loras(folder: Path, count: int, rank: int = 16, arch: str = "sdxl-arch", prefix: str = "soak") -> list[str]:
    """`count` random LoRAs `<prefix>-<i>` on every attention projection of the `arch` UNet
    (`configs/models/<arch>`: its shapes from the config on the meta device, nothing is
    allocated), in diffusers' PEFT format, written into `folder` (a LoRA registry)."""
    import json

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from configs.model_spec import MODEL_CONFIG_ROOT

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((MODEL_CONFIG_ROOT / arch / "unet" / "config.json").read_text()))
    linears = [(name, m) for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for name, linear in linears:
            tensors[f"unet.{name}.lora_A.weight"] = (torch.randn(rank, linear.in_features, generator=generator) * 0.01).half()
            tensors[f"unet.{name}.lora_B.weight"] = (torch.randn(linear.out_features, rank, generator=generator) * 0.01).half()
        save_file(tensors, str(folder / f"{prefix}-{index}.safetensors"))
        names.append(f"{prefix}-{index}")
    return names
