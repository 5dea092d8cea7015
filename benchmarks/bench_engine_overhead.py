"""What one step of the engine's loop costs besides its UNet call (issue #21: "the per-step Python
overhead of the engine's loop"), in process (no Ray): per step, the wall time, the UNet call's
share and the rest (admission bookkeeping, per-row scheduler steps and guidance, progress), and how
many tensor ops the rest issues (on a GPU most are a kernel launch each).

    python benchmarks/bench_engine_overhead.py --out bench-out/engine-overhead-cpu        # CPU, the tiny model
    python benchmarks/bench_engine_overhead.py --model '{"source": "sdxl-arch", "device": "cuda", "dtype": "float16"}' \\
        --size 1024 --out $OUT                                                           # GPU (eager)

For each --images count and --scheduler, that many guided requests (--size, guidance 5) run in one
eager engine: two untimed steps admit them and warm up, then --steps steps are timed one by one,
the UNet's calls timed by forward hooks on `pipe.unet` with the device synchronized on either
side (so the rest is measured with the device idle: what the host adds to every step when
nothing overlaps it). The requests have more steps than are timed, so no row retires (no VAE
decode) while timing. Then one more step counts the ops dispatched outside the UNet: `ops` all of
them, `launching` those that are not views (a view launches no kernel).
Prints a table and writes `bench_engine_overhead.json` into --out.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from pydantic import TypeAdapter
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.model_spec import ModelSpec, TinySpec  # noqa: E402
from deployments.engine.loop import StepEngine  # noqa: E402
from deployments.pipelines import load_pipeline  # noqa: E402
from deployments.types import GenerationRequest  # noqa: E402

from load import run_header  # noqa: E402
from step_timing import synchronize  # noqa: E402

_WARM_STEPS = 2


class _UnetTimer:
    """Seconds spent inside `unet`'s forward calls, the device synchronized at each edge."""

    def __init__(self, unet: torch.nn.Module, device: torch.device):
        self.seconds = 0.0
        self.inside = False
        self._device = device
        self._started = 0.0
        unet.register_forward_pre_hook(self._enter)
        unet.register_forward_hook(self._leave)

    def _enter(self, *_: object) -> None:
        synchronize(self._device)
        self.inside = True
        self._started = time.perf_counter()

    def _leave(self, *_: object) -> None:
        synchronize(self._device)
        self.seconds += time.perf_counter() - self._started
        self.inside = False


class _OpCounter(TorchDispatchMode):
    """Ops dispatched while `timer` says the UNet is not running."""

    def __init__(self, timer: _UnetTimer):
        super().__init__()
        self.timer = timer
        self.ops = 0
        self.launching = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.timer.inside:
            self.ops += 1
            self.launching += not func.is_view
        return func(*args, **(kwargs or {}))


def _measure(engine: StepEngine, timer: _UnetTimer, requests: list[GenerationRequest], steps: int, device: torch.device) -> dict:
    for request in requests:
        engine.submit(request)
    for _ in range(_WARM_STEPS):
        engine.step()
    step_s, unet_s = [], []
    for _ in range(steps):
        timer.seconds = 0.0
        synchronize(device)
        started = time.perf_counter()
        engine.step()
        synchronize(device)
        step_s.append(time.perf_counter() - started)
        unet_s.append(timer.seconds)
    counter = _OpCounter(timer)
    with counter:
        engine.step()
    engine.run_until_idle()  # the rows finish (and decode) untimed, leaving the engine empty
    rest_s = [total - unet for total, unet in zip(step_s, unet_s)]
    return {
        "step_ms": round(statistics.median(step_s) * 1e3, 3),
        "unet_ms": round(statistics.median(unet_s) * 1e3, 3),
        "rest_ms": round(statistics.median(rest_s) * 1e3, 3),
        "rest_share": round(statistics.median(rest / total for rest, total in zip(rest_s, step_s)), 4),
        "ops_outside_unet": counter.ops,
        "launching_ops_outside_unet": counter.launching,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model spec as JSON (default: the tiny model on CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--images", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--schedulers", type=lambda s: s.split(","), default=["euler", "dpmpp_2m"])
    parser.add_argument("--steps", type=int, default=10, help="steps timed per case")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. The pipeline, the UNet's timer and an eager engine with room for every case's requests.
    spec = TypeAdapter(ModelSpec).validate_python(json.loads(args.model)) if args.model else TinySpec(device="cpu")
    args.size = args.size or spec.default_size[0]
    pipe = load_pipeline(spec)
    device = pipe.unet.device
    timer = _UnetTimer(pipe.unet, device)
    engine = StepEngine(pipe, max_rows=max(args.images))
    report = {**run_header("bench_engine_overhead"), "settings": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    report["load_average_at_start"] = os.getloadavg()

    def save() -> None:
        (args.out / "bench_engine_overhead.json").write_text(json.dumps(report, indent=2))

    # 2. Each case on the same engine, one after the other.
    for scheduler in args.schedulers:
        for images in args.images:
            requests = [
                GenerationRequest(
                    prompt="a red star on a blue background", seed=seed, width=args.size, height=args.size,
                    num_inference_steps=_WARM_STEPS + args.steps + 2, guidance_scale=5.0, scheduler=scheduler,
                ).with_defaults(spec)
                for seed in range(images)
            ]
            row = {"scheduler": scheduler, "images": images, **_measure(engine, timer, requests, args.steps, device)}
            report["rows"].append(row)
            save()  # each case as it finishes: a run cut short keeps what it measured
            print(f"{scheduler} x{images}: {row}", flush=True)
    report["load_average_at_end"] = os.getloadavg()
    save()

    # 3. The table.
    print(f"{'scheduler':>10} {'images':>6} {'step ms':>9} {'UNet ms':>9} {'rest ms':>8} {'rest %':>7} {'ops':>6} {'launching':>9}")
    for row in report["rows"]:
        print(
            f"{row['scheduler']:>10} {row['images']:>6} {row['step_ms']:>9} {row['unet_ms']:>9} {row['rest_ms']:>8} "
            f"{row['rest_share'] * 100:>6.1f}% {row['ops_outside_unet']:>6} {row['launching_ops_outside_unet']:>9}"
        )
    print(f"load average (1, 5, 15 min): {report['load_average_at_start']} at the start, {report['load_average_at_end']} at the end")
    print(f"wrote {args.out / 'bench_engine_overhead.json'}")


if __name__ == "__main__":
    main()
