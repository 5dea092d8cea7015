"""What `guidance_end` saves and what it costs, in process (no Ray): for each value, the UNet rows
an image runs, seconds per image, and how far its image moves from the fully guided one.

    python benchmarks/bench_guidance_end.py --out bench-out/guidance-end-cpu        # CPU, the tiny model
    python benchmarks/bench_guidance_end.py --model '{"source": "sdxl-arch", "device": "cuda", "dtype": "float16"}' \
        --size 1024 --out $OUT                                                      # GPU (eager)

Each --ends value runs the same --seeds requests (--steps steps at --guidance-scale, --scheduler),
--batch of them at a time in one eager engine (no compiled sizes: a guided image is 2 UNet rows a
step, 1 past its guidance_end), after one untimed batch; in each of --repeats rounds every batch of
seeds runs at every value back to back, in a rotating order.
- `seconds_per_image`: the median (`min_seconds_per_image`: the least) of a batch's wall time
  divided by its images;
- `speedup`: the median ratio of a batch's time at guidance_end 1 to the same batch's at the value,
  run seconds apart (what a busy machine skews least);
- `unet_rows_per_image`: from the engine's own counter (`stats()["unet_rows"]`); `guided_steps`
  counts the steps of a first-order scheduler (Heun evaluates twice a step);
- `difference`: pixel values in [0, 1] (RGB, every pixel of every seed) against the same seed at
  guidance_end 1: mean, 99th percentile and max of the absolute difference, and PSNR in dB. With
  random weights (`sdxl-arch`) the speed is real, the differences are not a picture's.
Prints a table and writes `bench_guidance_end.json` into --out.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import TypeAdapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.model_spec import ModelSpec, TinySpec  # noqa: E402
from deployments.engine.control import RunOutput  # noqa: E402
from deployments.engine.loop import StepEngine  # noqa: E402
from deployments.pipelines import load_pipeline  # noqa: E402
from deployments.types import GenerationRequest, guided_steps  # noqa: E402

from load import run_header  # noqa: E402
from step_timing import synchronize  # noqa: E402


def _requests(args, spec, guidance_end: float) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt="a red star on a blue background", negative_prompt="blurry", seed=seed, width=args.size,
            height=args.size, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            scheduler=args.scheduler, guidance_end=guidance_end,
        ).with_defaults(spec)
        for seed in range(args.seeds)
    ]


def _run(engine: StepEngine, requests: list[GenerationRequest], device: torch.device) -> tuple[float, list[np.ndarray]]:
    synchronize(device)
    started = time.perf_counter()
    outcomes = engine.generate(requests)
    synchronize(device)
    failed = [outcome for outcome in outcomes if not isinstance(outcome, RunOutput)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outcomes)} requests failed: {failed[0]!r}")
    return time.perf_counter() - started, [outcome.image for outcome in outcomes]


def _difference(images: list[np.ndarray], baseline: list[np.ndarray]) -> dict:
    difference = np.abs(np.stack(images) - np.stack(baseline))
    mse = float((difference**2).mean())
    return {
        "mean_abs": round(float(difference.mean()), 5),
        "p99_abs": round(float(np.quantile(difference, 0.99)), 5),
        "max_abs": round(float(difference.max()), 5),
        "psnr_db": round(float(10 * np.log10(1 / mse)), 2) if mse > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model spec as JSON (default: the tiny model on CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--ends", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.8, 0.6, 0.4])
    parser.add_argument("--seeds", type=int, default=4, help="requests per value, seeds 0..N-1")
    parser.add_argument("--batch", type=int, default=1, help="requests run together (1: each image alone)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if 1.0 not in args.ends:
        parser.error("--ends must include 1.0: the other values are compared with its images and speed")
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. The pipeline and one eager engine, holding --batch rows.
    spec = TypeAdapter(ModelSpec).validate_python(json.loads(args.model)) if args.model else TinySpec(device="cpu")
    args.size = args.size or spec.default_size[0]
    pipe = load_pipeline(spec)
    device = pipe.unet.device
    engine = StepEngine(pipe, max_rows=args.batch)
    report = {**run_header("bench_guidance_end"), "settings": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    # On a shared CPU the timings are only as good as the machine was idle: say how busy it was.
    report["load_average_at_start"] = os.getloadavg()

    def save() -> None:
        (args.out / "bench_guidance_end.json").write_text(json.dumps(report, indent=2))

    # 2. One untimed batch (first-call costs: allocations, kernels), then --repeats rounds. Each
    # batch of seeds runs at every value back to back (in an order that rotates), so a busy
    # machine slows the values alike, and each speedup is a ratio of runs seconds apart.
    requests = {end: _requests(args, spec, end) for end in args.ends}
    _run(engine, requests[args.ends[0]][: args.batch], device)
    seconds = {end: [] for end in args.ends}
    images = {end: [] for end in args.ends}
    rows = dict.fromkeys(args.ends, 0)
    turn = 0
    for repeat in range(args.repeats):
        for start in range(0, args.seeds, args.batch):
            for end in args.ends[turn % len(args.ends) :] + args.ends[: turn % len(args.ends)]:
                rows_before = engine.stats()["unet_rows"]
                wall_s, batch_images = _run(engine, requests[end][start : start + args.batch], device)
                rows[end] += engine.stats()["unet_rows"] - rows_before
                seconds[end].append(wall_s / len(batch_images))
                images[end] += batch_images if repeat == 0 else []
            turn += 1
        print(f"round {repeat + 1}/{args.repeats}: median s/image so far {[round(statistics.median(seconds[end]), 4) for end in args.ends]}", flush=True)

    # 3. Each value: rows and speed (the median of its paired ratios with guidance_end 1), and its
    # images against the fully guided ones (same seeds).
    for end in args.ends:
        ratios = [full / ours for full, ours in zip(seconds[1.0], seconds[end])]
        report["rows"].append({
            "guidance_end": end,
            "guided_steps": guided_steps(args.steps, end),
            "unet_rows_per_image": round(rows[end] / (args.repeats * args.seeds), 2),
            "seconds_per_image": round(statistics.median(seconds[end]), 4),
            "min_seconds_per_image": round(min(seconds[end]), 4),
            "speedup": round(statistics.median(ratios), 3),
            "difference": _difference(images[end], images[1.0]),
        })
    report["load_average_at_end"] = os.getloadavg()
    save()

    print(f"{'guidance_end':>12} {'guided':>7} {'UNet rows/img':>13} {'s/img':>8} {'min s':>8} {'speedup':>8} "
          f"{'mean |Δ|':>9} {'p99 |Δ|':>8} {'max |Δ|':>8} {'PSNR dB':>8}")
    for row in report["rows"]:
        d = row["difference"]
        print(
            f"{row['guidance_end']:>12} {row['guided_steps']:>7} {row['unet_rows_per_image']:>13} {row['seconds_per_image']:>8} "
            f"{row['min_seconds_per_image']:>8} {row['speedup']:>8} {d['mean_abs']:>9} {d['p99_abs']:>8} {d['max_abs']:>8} "
            f"{str(d['psnr_db'] or '—'):>8}"
        )
    print(f"load average (1, 5, 15 min): {report['load_average_at_start']} at the start, {report['load_average_at_end']} at the end")
    print(f"wrote {args.out / 'bench_guidance_end.json'}")


if __name__ == "__main__":
    main()
