"""LoRA training on a serving engine, in process (no Ray): training speed per rank, and what a
training job costs the requests the engine serves.

    python benchmarks/bench_training.py --out bench-out/training-cpu                 # CPU, the tiny model, 128²
    python benchmarks/bench_training.py --model '{"source": "sdxl-arch", "device": "cuda", "dtype": "float16"}' \
        --resolution 1024 --ranks 16,64 --out $OUT                                   # GPU (gpu_suite.sh training)

1. `speed`: a `LoraTrainer` per rank in --ranks (batch 1, --resolution², UNet LoRA), two untimed
   steps, then --steps timed: steps/s and peak device memory.
2. `pause`: the engine's loop on its thread with a training job running (training.idle_s = 0,
   the worst case: a step is always in progress when a request comes). --requests requests
   arrive one at a time, each at a random point of a training step: the time from `submit` to
   the request's first denoising step, against the same with no training job.
3. `paused`: --requests requests one after another, 0.1 s apart, with a training job waiting
   (training.idle_s = 1: the gaps never start a step) and with none: each request's latency.
Prints a table and writes `bench_training.json` into --out after every part.
"""

import argparse
import contextlib
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from pydantic import TypeAdapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.model_spec import ModelSpec, OptimizeConfig, TinySpec  # noqa: E402
from deployments.engine.control import RequestControl  # noqa: E402
from deployments.engine.lora_trainer import LoraTrainer  # noqa: E402
from deployments.engine.loop import StepEngine  # noqa: E402
from deployments.engine.training_queue import TrainingControl, TrainingQueue  # noqa: E402
from deployments.lora_registry import LoraRegistry  # noqa: E402
from deployments.pipelines import load_pipeline  # noqa: E402
from deployments.training import LoraTrainingSettings, TrainingExample  # noqa: E402
from deployments.types import GenerationRequest  # noqa: E402

from load import run_header  # noqa: E402
from step_timing import synchronize  # noqa: E402


def _examples(resolution: int, count: int = 8) -> list[TrainingExample]:
    rng = np.random.default_rng(0)
    return [TrainingExample(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8), f"an example {i}") for i in range(count)]


def speed(args, load, device) -> list[dict]:
    rows = []
    for rank in args.ranks:
        settings = LoraTrainingSettings(name="bench", rank=rank, steps=args.steps + 2, seed=0).with_defaults(args.resolution)
        trainer = LoraTrainer(load, settings, _examples(args.resolution))
        trainer.step(), trainer.step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            trainer.step()
        synchronize(device)
        seconds = time.perf_counter() - started
        row = {"rank": rank, "steps_per_s": round(args.steps / seconds, 3), "step_s": round(seconds / args.steps, 4)}
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows.append(row)
        print(row, flush=True)
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _first_step_s(engine: StepEngine, request: GenerationRequest) -> tuple[float, float]:
    """Seconds from submit to the first denoising step, and to the image."""
    first = threading.Event()
    started = time.perf_counter()
    control = RequestControl(on_progress=lambda step, total: first.set())
    engine.submit(request, control)
    first.wait(timeout=600)
    first_s = time.perf_counter() - started
    control.wait(timeout=600)
    return first_s, time.perf_counter() - started


@contextlib.contextmanager
def _training_job(queue: TrainingQueue, name: str, resolution: int, on: bool) -> Iterator[None]:
    """With `on`, an endless training job on the engine (it has run two steps when this
    enters), cancelled and discarded on exit; without, nothing."""
    if not on:
        yield
        return
    control = TrainingControl()
    settings = LoraTrainingSettings(name=name, rank=16, steps=100_000, seed=0).with_defaults(resolution)
    queue.submit(name, settings, _examples(resolution), control)
    while queue.stats()["steps"] < 2:
        time.sleep(0.01)
    try:
        yield
    finally:
        control.cancel()
        control.wait(timeout=600)
        queue.discard(name)


def pause(args, engine: StepEngine, queue: TrainingQueue, request: GenerationRequest, step_s: float) -> dict:
    rng = random.Random(0)
    measured = {}
    for mode in ("none", "training"):
        firsts = []
        with _training_job(queue, "bench-pause", args.resolution, on=mode == "training"):
            for index in range(args.requests):
                time.sleep(rng.uniform(0, step_s) + (step_s if mode == "training" else 0.0))
                first_s, _ = _first_step_s(engine, request.model_copy(update={"request_id": f"pause-{mode}-{index}"}))
                firsts.append(first_s)
        measured[mode] = {"first_step_p50_s": round(statistics.median(firsts), 4), "first_step_max_s": round(max(firsts), 4)}
        print(mode, measured[mode], flush=True)
    return measured


def paused(args, engine: StepEngine, queue: TrainingQueue, request: GenerationRequest) -> dict:
    measured = {}
    queue.idle_s = 1.0
    for mode in ("none", "paused"):
        latencies = []
        with _training_job(queue, "bench-paused", args.resolution, on=mode == "paused"):
            for index in range(args.requests):
                _, total_s = _first_step_s(engine, request.model_copy(update={"request_id": f"paused-{mode}-{index}"}))
                latencies.append(total_s)
                time.sleep(0.1)
        measured[mode] = {"p50_s": round(statistics.median(latencies), 4), "mean_s": round(statistics.fmean(latencies), 4)}
        print(mode, measured[mode], flush=True)
    measured["paused_over_none"] = round(measured["paused"]["p50_s"] / measured["none"]["p50_s"], 3)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model spec as JSON (default: the tiny model on CPU)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per rank")
    parser.add_argument("--request-steps", type=int, default=30, help="denoising steps of the served requests")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    spec = TypeAdapter(ModelSpec).validate_python(json.loads(args.model)) if args.model else TinySpec(device="cpu")
    plain = spec.model_copy(update={"optimize": OptimizeConfig()})
    pipe = load_pipeline(spec)
    device = pipe.unet.device
    report = {**run_header("bench_training"), "settings": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        (args.out / "bench_training.json").write_text(json.dumps(report, indent=2))

    # 1. Training speed per rank (the trainer's own pipeline, as a replica loads it).
    report["speed"] = speed(args, lambda: load_pipeline(plain), device)
    save()
    step_s = min(row["step_s"] for row in report["speed"])

    # 2-3. The engine serving while a job trains, then while one waits.
    queue = TrainingQueue(
        lambda settings, examples, folder: LoraTrainer(lambda: load_pipeline(plain), settings, examples, folder),
        LoraRegistry(args.out / "loras"), args.out / "checkpoints", checkpoint_every=100_000,
    )
    engine = StepEngine(pipe, max_rows=8, background=queue)
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    loop.start()
    request = GenerationRequest(
        prompt="a red circle", seed=1, width=args.resolution, height=args.resolution, num_inference_steps=args.request_steps
    ).with_defaults(spec)
    try:
        _first_step_s(engine, request.model_copy(update={"request_id": "warm-up"}))
        report["pause"] = pause(args, engine, queue, request, step_s)
        save()
        report["paused"] = paused(args, engine, queue, request)
        save()
    finally:
        stop.set()
        loop.join(timeout=60)

    print(f"{'rank':>5} {'steps/s':>8} {'s/step':>8} {'peak GiB':>9}")
    for row in report["speed"]:
        print(f"{row['rank']:>5} {row['steps_per_s']:>8} {row['step_s']:>8} {row.get('peak_gib', '—'):>9}")
    print("first denoising step after arrival:", report["pause"])
    print("latency with a paused job:", report["paused"])
    print(f"wrote {args.out / 'bench_training.json'}")


if __name__ == "__main__":
    main()
