"""Hires images in the step engine, in process (no Ray): time and peak device memory of a hires
request (a first pass, then an image-to-image pass at the larger size), alone and as a batch,
with the VAE tiled and untiled; and how much tiling changes the image.

    python benchmarks/bench_hires.py --out bench-out/hires-cpu                 # CPU, the tiny model, 128² → 256²
    python benchmarks/bench_hires.py --model '{"source": "sdxl-arch", "device": "cuda", "dtype": "float16"}' \
        --size 1024 --target 2048 --out $OUT                                   # GPU (gpu_suite.sh hires)

Each configuration runs --batch sizes of identical hires requests (different seeds) after one
untimed run of the same shape, --repeats timed runs, median reported. `tiled`: VAE encodes and
decodes above 1024² pixels run in tiles (the served default, `optimize.vae_tiling_above_pixels`);
`untiled`: never. The hires pass runs --hires-steps scheduler steps at --strength, so
int(hires_steps × strength) denoising steps at the target size (defaults: 38 × 0.4 = 15).
Prints a table and writes `bench_hires.json` into --out after every configuration.
"""

import argparse
import json
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
from deployments.types import GenerationRequest, HiresSettings  # noqa: E402

from load import run_header  # noqa: E402


def _requests(args, spec, count: int) -> list[GenerationRequest]:
    hires = HiresSettings(width=args.target, height=args.target, strength=args.strength, steps=args.hires_steps, upscaler=args.upscaler)
    return [
        GenerationRequest(
            prompt="a red star on a blue background", seed=seed, width=args.size, height=args.size,
            num_inference_steps=args.steps, hires=hires,
        ).with_defaults(spec)
        for seed in range(count)
    ]


def _run(engine: StepEngine, requests: list[GenerationRequest], device: torch.device) -> tuple[float, list[np.ndarray]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    outcomes = engine.generate(requests)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    failed = [outcome for outcome in outcomes if not isinstance(outcome, RunOutput)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outcomes)} requests failed: {failed[0]!r}")
    return time.perf_counter() - started, [outcome.image for outcome in outcomes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model spec as JSON (default: the tiny model on CPU)")
    parser.add_argument("--size", type=int, default=128, help="the first pass's side")
    parser.add_argument("--target", type=int, default=256, help="the hires pass's side")
    parser.add_argument("--steps", type=int, default=30, help="the first pass's steps")
    parser.add_argument("--hires-steps", type=int, default=38)
    parser.add_argument("--strength", type=float, default=0.4)
    parser.add_argument("--upscaler", choices=["lanczos", "latent"], default="lanczos")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tile-above", type=int, default=1024 * 1024, help="pixels above which `tiled` tiles")
    parser.add_argument("--vae", type=lambda s: s.split(","), default=["tiled", "untiled"], help="tiled, untiled or both")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. The pipeline and one engine (eager: compiled graphs exist for the default size only).
    spec = TypeAdapter(ModelSpec).validate_python(json.loads(args.model)) if args.model else TinySpec(device="cpu")
    pipe = load_pipeline(spec)
    device = pipe.unet.device
    report = {**run_header("bench_hires"), "settings": {k: str(v) for k, v in vars(args).items()}, "rows": []}

    def save() -> None:
        (args.out / "bench_hires.json").write_text(json.dumps(report, indent=2))

    # 2. Each batch size, tiled and untiled: warm-up, then timed runs with the peak memory.
    images = {}
    for batch in args.batches:
        for tiling, above in (("tiled", args.tile_above), ("untiled", None)):
            if tiling not in args.vae:
                continue
            engine = StepEngine(pipe, max_rows=batch, vae_tiling_above=above)
            requests = _requests(args, spec, batch)
            row = {"batch": batch, "vae": tiling}
            try:
                _run(engine, requests, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(args.repeats):
                    seconds, images[(batch, tiling)] = _run(engine, requests, device)
                    times.append(seconds)
                row |= {"seconds": round(statistics.median(times), 3), "images_per_s": round(batch / statistics.median(times), 3)}
                if device.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            except (torch.OutOfMemoryError, RuntimeError) as error:  # out of memory is what tiling is for
                row["error"] = str(error)[:160]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["rows"].append(row)
            save()
            print(row, flush=True)

    # 3. What tiling changes: the same requests' images, tiled against untiled.
    batch = args.batches[0]
    if (batch, "tiled") in images and (batch, "untiled") in images:
        difference = np.abs(np.stack(images[(batch, "tiled")]) - np.stack(images[(batch, "untiled")]))
        report["tiling_difference"] = {
            "mean": round(float(difference.mean()), 5),
            "p99": round(float(np.quantile(difference, 0.99)), 5),
            "max": round(float(difference.max()), 5),
        }
        save()

    print(f"{'batch':>5} {'vae':>8} {'seconds':>9} {'img/s':>7} {'peak GiB':>9}")
    for row in report["rows"]:
        print(f"{row['batch']:>5} {row['vae']:>8} {row.get('seconds', '—'):>9} {row.get('images_per_s', '—'):>7} {row.get('peak_gib', '—'):>9}"
              + (f"  {row['error']}" if "error" in row else ""))
    if "tiling_difference" in report:
        print(f"tiled vs untiled, pixels in [0, 1]: {report['tiling_difference']}")
    print(f"wrote {args.out / 'bench_hires.json'}")


if __name__ == "__main__":
    main()
