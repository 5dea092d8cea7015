"""ControlNet costs in the step engine, in process (no Ray): the step-time overhead of steered rows.

    python benchmarks/bench_controlnet.py --out bench-out/                      # CPU, the tiny model
    python benchmarks/bench_controlnet.py --model '{"source": "sdxl-arch", "device": "cuda",
        "dtype": "float16"}' --controlnet '{"source": "sdxl-arch"}' --size 1024 --out $OUT   # GPU

One guided step (the ControlNet over the rows it steers, then one UNet forward with their
residuals) of: one base row, one steered row, --batch base rows, --batch steered rows, and --batch
rows of which half are steered — in one forward (the engine's way) and split into two forwards,
steered rows apart; median of --repeats after one untimed run. Also the ControlNet's parameters
and device memory.
Prints a table and writes `bench_controlnet.json` into --out.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import TypeAdapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.model_spec import ControlNetSpec, ModelSpec, TinyControlNetSpec, TinySpec  # noqa: E402
from deployments.engine.control import RequestControl  # noqa: E402
from deployments.engine.loop import StepEngine  # noqa: E402
from deployments.pipelines import load_controlnet, load_pipeline  # noqa: E402
from deployments.types import ControlRef, GenerationRequest  # noqa: E402

from step_timing import timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model spec as JSON (default: the tiny model on CPU)")
    parser.add_argument("--controlnet", default=None, help="a ControlNet spec as JSON (default: the tiny canny one)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    # 1. The pipeline, the ControlNet, the engine and one prepared row of each kind.
    spec = TypeAdapter(ModelSpec).validate_python(json.loads(args.model)) if args.model else TinySpec(device="cpu")
    net_spec = TypeAdapter(ControlNetSpec).validate_python(json.loads(args.controlnet)) if args.controlnet else TinyControlNetSpec()
    pipe = load_pipeline(spec)
    device = pipe.unet.device
    memory_before = torch.cuda.memory_allocated() if device.type == "cuda" else None
    net = load_controlnet(net_spec, device, pipe.unet.dtype)
    memory_net = torch.cuda.memory_allocated() - memory_before if device.type == "cuda" else None
    engine = StepEngine(
        pipe, max_rows=args.batch, controlnets={"net": net}, buckets=spec.optimize.buckets(),
        unguided_bucket=spec.optimize.unguided_bucket,
    )
    side = args.size or spec.default_size[0]
    edges = np.zeros((side, side, 3), dtype=np.uint8)
    edges[side // 4 : 3 * side // 4, side // 4] = 255
    plain = GenerationRequest(prompt="a red circle", seed=0, width=side, height=side, num_inference_steps=30).with_defaults(spec)
    steered = plain.model_copy(update={"controlnets": (ControlRef(name="net", image=edges),)})
    (embeds,) = engine._rows.encode([plain])

    def row(request: GenerationRequest):
        return engine._rows.prepare(request, RequestControl(), embeds, time.perf_counter())

    base, control = row(plain), row(steered)
    half = [base, control] * (args.batch // 2)

    # 2. One guided step of each mix.
    with torch.inference_mode():
        step = {
            "base_1": timed(lambda: engine._unet([base]), device, args.repeats),
            "controlnet_1": timed(lambda: engine._unet([control]), device, args.repeats),
            f"base_{args.batch}": timed(lambda: engine._unet([base] * args.batch), device, args.repeats),
            f"controlnet_{args.batch}": timed(lambda: engine._unet([control] * args.batch), device, args.repeats),
            f"half_{args.batch}_one_forward": timed(lambda: engine._unet(half), device, args.repeats),
            f"half_{args.batch}_split": timed(
                lambda: (engine._unet(half[0::2]), engine._unet(half[1::2])), device, args.repeats
            ),
        }
    report = {
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": spec.model_dump(mode="json"),
        "controlnet": net_spec.model_dump(mode="json"),
        "controlnet_parameters": sum(p.numel() for p in net.parameters()),
        "controlnet_memory_gib": None if memory_net is None else round(memory_net / 2**30, 3),
        "size": side,
        "step_s": {name: round(seconds, 4) for name, seconds in step.items()},
        "overhead": {
            "controlnet_1": round(step["controlnet_1"] / step["base_1"] - 1, 4),
            f"controlnet_{args.batch}": round(step[f"controlnet_{args.batch}"] / step[f"base_{args.batch}"] - 1, 4),
            f"half_{args.batch}_one_forward": round(step[f"half_{args.batch}_one_forward"] / step[f"base_{args.batch}"] - 1, 4),
            f"half_{args.batch}_split": round(step[f"half_{args.batch}_split"] / step[f"base_{args.batch}"] - 1, 4),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_controlnet.json").write_text(json.dumps(report, indent=2))
    print(f"{report['device']}, {side}², ControlNet {report['controlnet_parameters'] / 1e6:.1f} M parameters")
    print("step | s | vs base")
    for name, seconds in report["step_s"].items():
        base_s = step["base_1"] if name.endswith("_1") else step[f"base_{args.batch}"]
        print(f"{name} | {seconds} | {seconds / base_s:.3f}×")


if __name__ == "__main__":
    main()
