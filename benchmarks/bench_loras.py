"""LoRA serving costs in the step engine, in process (no Ray): cold loads, cached switches, step-time
overhead of adapters, slot-batched rows against one sub-forward per adapter set, recompiles.

    python benchmarks/bench_loras.py --out bench-out/                         # CPU, the tiny model
    python benchmarks/bench_loras.py --model "$(compiled spec JSON)" --size 1024 \
        --rank 64 --adapters 30 --out $OUT                                     # GPU (gpu_suite.sh loras)

Random LoRAs of --rank on every UNet attention projection (to_q, to_k, to_v, to_out.0) are written
as PEFT-format safetensors, registered, and served by the engine's own `AdapterCache`:
1. `cold_load_s`: reading, checking and writing one set into a free slot (each of --adapters);
2. `switch_ms`: with 2, 10 and 30 sets resident, what a request for a resident set costs before
   its row runs (the cache lookup), and one guided UNet step whose row takes a different resident
   set each step against the same set every step;
3. `step_s`: one guided UNet step (one row = one image) of: the base alone, one LoRA, --batch rows
   of the base, --batch rows each with its own LoRA in one forward (the engine's way), and the same
   rows as one sub-forward per set (the alternative the issue asks to measure);
4. `recompiles`: with a compiled UNet (`optimize.compile`), dynamo frames compiled while sets
   change after the warm-up (run under `error_on_recompile`);
5. `memory`: device memory before the slots, with them, after loading every set, after evicting.
Prints a table and writes `bench_loras.json` into --out.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.model_spec import ModelSpec, TinySpec  # noqa: E402
from deployments.engine.control import RequestControl  # noqa: E402
from deployments.engine.lora import AdapterCache  # noqa: E402
from deployments.engine.loop import StepEngine  # noqa: E402
from deployments.lora_registry import LoraRegistry  # noqa: E402
from deployments.pipelines import load_pipeline  # noqa: E402
from deployments.types import GenerationRequest, LoraRef  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from step_timing import synchronize, timed  # noqa: E402

ATTENTION = r"unet\..*\.(to_q|to_k|to_v|to_out\.0)"


def write_loras(pipe, folder: Path, count: int, rank: int) -> list[str]:
    """`count` random LoRAs on every UNet attention projection, in diffusers' PEFT format."""
    names = []
    linears = [
        (name, module)
        for name, module in pipe.unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]
    device = pipe.unet.device  # drawn there: 30 full-size rank-64 files are ~3 G numbers
    for index in range(count):
        generator = torch.Generator(device).manual_seed(index)

        def draw(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=generator, device=device) * 0.01).half().cpu()

        tensors = {}
        for name, linear in linears:
            tensors[f"unet.{name}.lora_A.weight"] = draw(rank, linear.in_features)
            tensors[f"unet.{name}.lora_B.weight"] = draw(linear.out_features, rank)
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": rank})}
        save_file(tensors, str(folder / f"style-{index:02d}.safetensors"), metadata=metadata)
        names.append(f"style-{index:02d}")
    return names


def _memory(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated() / 2**30, 3) if device.type == "cuda" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model spec as JSON (default: the tiny model on CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=30, help="LoRA files written and loaded (at least 30)")
    parser.add_argument("--batch", type=int, default=8, help="rows of the mixed-adapter step")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.adapters < 30:
        parser.error("--adapters must be at least 30 (the switch is measured with 30 resident)")

    # 1. The pipeline, the LoRA files, the cache and the engine (warmed up as the factory does).
    spec = TypeAdapter(ModelSpec).validate_python(json.loads(args.model)) if args.model else TinySpec(device="cpu")
    pipe = load_pipeline(spec)
    device = pipe.unet.device
    folder = Path(tempfile.mkdtemp(prefix="bench-loras-"))
    names = write_loras(pipe, folder, args.adapters, args.rank)
    memory = {"before_slots_gib": _memory(device)}
    compiled = spec.optimize.compile != "off"
    cache = AdapterCache(
        pipe, LoraRegistry(folder), size=args.adapters, max_rank=args.rank, targets=(ATTENTION,), frozen=("unet",) if compiled else ()
    )
    memory["with_slots_gib"] = _memory(device)
    memory["slot_bytes"] = cache.slots.bytes()
    engine = StepEngine(
        pipe, max_rows=args.batch, adapters=cache, buckets=spec.optimize.buckets(),
        unguided_bucket=spec.optimize.unguided_bucket,
    )
    side = args.size or spec.default_size[0]
    request = GenerationRequest(prompt="a red circle", seed=0, width=side, height=side, num_inference_steps=2).with_defaults(spec)
    started = time.perf_counter()
    if compiled:
        engine.warmup(request)
    warmup_s = time.perf_counter() - started
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]

    # 2. Cold loads: every set into a free slot.
    cold = []
    for name in names:
        started = time.perf_counter()
        cache.release(cache.acquire((LoraRef(name=name),)))
        synchronize(device)
        cold.append(time.perf_counter() - started)
    memory["all_loaded_gib"] = _memory(device)

    (embeds,) = engine._rows.encode([request])

    def row(slot: int):
        return engine._rows.prepare(request, RequestControl(), embeds, time.perf_counter(), slot)

    def slot_of(name: str) -> int:
        slot = cache.acquire((LoraRef(name=name),))
        cache.release(slot)
        return slot

    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=compiled):
        # 3. Cached switches with 2, 10 and 30 sets in use.
        switch = {}
        for resident in (2, 10, 30):
            in_use = names[:resident]
            lookups = []
            for turn in range(300):
                started = time.perf_counter()
                slot_of(in_use[turn % resident])
                lookups.append(time.perf_counter() - started)
            rows = [row(slot_of(name)) for name in in_use]
            turn = iter(range(10**9))
            switch[resident] = {
                "lookup_ms": round(statistics.median(lookups) * 1000, 4),
                "step_switching_s": round(timed(lambda: engine._unet([rows[next(turn) % resident]]), device, args.repeats), 4),
                "step_same_set_s": round(timed(lambda: engine._unet([rows[0]]), device, args.repeats), 4),
            }

        # 4. Step time: base, one LoRA, a batch of the base, a batch of different LoRAs two ways.
        batch_names = names[: args.batch]
        base, one = row(0), row(slot_of(names[0]))
        mixed = [row(slot_of(name)) for name in batch_names]
        step = {
            "base_1": timed(lambda: engine._unet([base]), device, args.repeats),
            "lora_1": timed(lambda: engine._unet([one]), device, args.repeats),
            f"base_{args.batch}": timed(lambda: engine._unet([base] * args.batch), device, args.repeats),
            f"mixed_{args.batch}_one_forward": timed(lambda: engine._unet(mixed), device, args.repeats),
            f"mixed_{args.batch}_sub_forwards": timed(lambda: [engine._unet([r]) for r in mixed], device, args.repeats),
        }
    recompiles = torch._dynamo.utils.counters["frames"]["ok"] - frames_before

    # 5. Evictions: --adapters more sets through the full cache.
    for name in names:
        cache.release(cache.acquire((LoraRef(name=name, weight=0.5),)))
    synchronize(device)
    memory["after_evictions_gib"] = _memory(device)

    report = {
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": spec.model_dump(mode="json"),
        "size": side,
        "rank": args.rank,
        "adapters": args.adapters,
        "warmup_s": round(warmup_s, 2),
        "cold_load_s": {"first": round(cold[0], 4), "median": round(statistics.median(cold), 4), "max": round(max(cold), 4)},
        "switch": switch,
        "step_s": {name: round(seconds, 4) for name, seconds in step.items()},
        "overhead": {
            "lora_1": round(step["lora_1"] / step["base_1"] - 1, 4),
            f"mixed_{args.batch}": round(step[f"mixed_{args.batch}_one_forward"] / step[f"base_{args.batch}"] - 1, 4),
            f"sub_forwards_{args.batch}": round(step[f"mixed_{args.batch}_sub_forwards"] / step[f"base_{args.batch}"] - 1, 4),
        },
        "recompiles_while_switching": recompiles if compiled else None,
        "memory": memory,
        "cache": cache.stats() | {"resident_sets": None},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_loras.json").write_text(json.dumps(report, indent=2))
    print(f"{report['device']}, rank {args.rank}, {side}², compiled: {compiled}, warm-up {report['warmup_s']} s")
    print(f"cold load s: {report['cold_load_s']}")
    print("resident | lookup ms | step, switching set s | step, same set s")
    for resident, row_ in switch.items():
        print(f"{resident:>8} | {row_['lookup_ms']:>9} | {row_['step_switching_s']:>21} | {row_['step_same_set_s']}")
    print("step | s | vs base")
    for name, seconds in report["step_s"].items():
        base_s = step["base_1"] if name.endswith("_1") else step[f"base_{args.batch}"]
        print(f"{name} | {seconds} | {seconds / base_s:.3f}×")
    print(f"recompiles while switching: {report['recompiles_while_switching']}; memory: {memory}")


if __name__ == "__main__":
    main()
