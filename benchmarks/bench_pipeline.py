"""In-process GPU benchmark of the base pipeline: latency and img/s per batch size, per-stage time
(text encoders, one CFG UNet step, VAE decode), peak memory, achieved TFLOP/s, and each speed-up's
fidelity (PSNR against the unoptimized fp16 image of the same seed). Full-size SDXL architecture
with random weights (`sdxl-arch`): the real cost, noise images.

    python benchmarks/bench_pipeline.py --out $OUT                         # every variant below
    python benchmarks/bench_pipeline.py --variants baseline,bf16 --batches 1,8 --out $OUT
    # few-step unguided requests (LCM/Lightning/Turbo), with and without the one-row UNet bucket:
    python benchmarks/bench_pipeline.py --variants compile_vae,compile_vae_unguided --guidance 1.0 --steps 4 \
        --batches 1,8 --out $OUT

Variants are `ModelSpec.optimize` switch sets (see VARIANTS). Compiled variants time their buckets
after each batch's first call, as a replica's warm-up does, so forwards are planned on measured
costs (an unguided batch of 8 is 8 UNet rows: unmeasured, four calls of 2 would look cheaper than
one of 16). Prints a table, writes `bench_pipeline.json` to --out. Run one variant per process
(`--variants compile`) to measure a cold compile, then again with the same `--compile-cache` for
the warm start. `--served` builds each engine as a Serve replica does (`EngineFactory`: its
warm-up, its timed call costs, the LoRA slot layers every served engine has), without Ray: what
separates a replica's speed from this process's. `--replica-threads` (with `--served`) also
runs the GPU work off this thread, as a replica does: the engine built on a thread of its own (Serve
constructs a replica on its user-code thread) and its loop on another (the replica's engine thread),
requests submitted to it and awaited. `--profile-warmup` (with `--served`) keeps a profile of one
UNet call per bucket from the warm-up (`optimize.profile_warmup`), as a replica can.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.app_args import LorasConfig  # noqa: E402
from configs.model_spec import SdxlArchSpec, TinySpec  # noqa: E402
from deployments.engine.factory import EngineFactory  # noqa: E402
from deployments.engine.loop import StepEngine, cuda_allocator_counts  # noqa: E402
from deployments.optimize import deep_cache_unet  # noqa: E402
from deployments.pipelines import load_pipeline  # noqa: E402
from deployments.types import GenerationRequest  # noqa: E402

#: One CFG step of the SDXL base UNet at 1024², batch 1 (2 with CFG): measured with FlopCounter.
CFG_STEP_TFLOP_1024 = 13.52

#: Each transformer block compiled (diffusers' compile_repeated_blocks): a bounded cold start.
_REGIONAL = {"channels_last": True, "fuse_qkv": True, "compile": "unet", "compile_scope": "regional", "batch_buckets": [1, 8]}

VARIANTS: dict[str, dict] = {
    "baseline": {"dtype": "float16", "optimize": {}},
    "bf16": {"dtype": "bfloat16", "optimize": {}},
    "channels_last": {"dtype": "float16", "optimize": {"channels_last": True}},
    "fuse_qkv": {"dtype": "float16", "optimize": {"fuse_qkv": True}},
    "cl_qkv": {"dtype": "float16", "optimize": {"channels_last": True, "fuse_qkv": True}},
    # xformers cannot take fused projections (their processor is SDPA's): its best pairing is CL.
    "xformers": {"dtype": "float16", "attention": "xformers", "optimize": {}},
    "xformers_cl": {"dtype": "float16", "attention": "xformers", "optimize": {"channels_last": True}},
    "compile": {
        "dtype": "float16",
        "optimize": {"channels_last": True, "fuse_qkv": True, "compile": "unet", "batch_buckets": [1, 8]},
    },
    "compile_regional": {"dtype": "float16", "optimize": _REGIONAL},
    # Every transformer block, ResNet block and sampler compiled (the UNet's, and with unet+vae the
    # VAE decoder's), the glue between them eager: a cold start between regional's and full's?
    **{
        f"{name}blocks{suffix}": {
            "dtype": "float16",
            "optimize": {**layout, "fuse_qkv": True, "compile": compile, "compile_scope": "blocks", "batch_buckets": [1, 8]},
        }
        for name, compile in (("compile_", "unet"), ("compile_vae_", "unet+vae"))
        for suffix, layout in (("", {"channels_last": True}), ("_nocl", {}))
    },
    # One graph for every bucket (dynamic batch and sizes): one compile per module instead of
    # one per bucket, if its kernels are not slower than static ones.
    "compile_vae_dynamic": {
        "dtype": "float16",
        "optimize": {
            "channels_last": True,
            "fuse_qkv": True,
            "compile": "unet+vae",
            "compile_dynamic": True,
            "batch_buckets": [1, 8],
        },
    },
    "compile_cudagraphs": {
        "dtype": "float16",
        "optimize": {
            "channels_last": True,
            "fuse_qkv": True,
            "compile": "unet",
            "compile_mode": "reduce-overhead",
            "batch_buckets": [1, 8],
        },
    },
    "vae_slicing": {"dtype": "float16", "optimize": {"vae_slicing": True}},
    "compile_vae": {
        "dtype": "float16",
        "optimize": {"channels_last": True, "fuse_qkv": True, "compile": "unet+vae", "batch_buckets": [1, 8]},
    },
    # A lone unguided image (guidance ≤ 1: one UNet row a step) runs a one-row call, not two rows.
    "compile_vae_unguided": {
        "dtype": "float16",
        "optimize": {
            "channels_last": True,
            "fuse_qkv": True,
            "compile": "unet+vae",
            "batch_buckets": [1, 8],
            "unguided_bucket": True,
        },
    },
    # Deep-feature caching (DeepCache): requests with `deep_cache_interval` N run the whole UNet
    # every N-th step and its shallow branch between; a variant's `request` sets request fields.
    # N = 1: plain requests on a deployment serving deep cache (every step the full pass).
    **{
        f"deep_cache_{n}": {"dtype": "float16", "optimize": {"deep_cache": True}, "request": {"deep_cache_interval": n}}
        for n in (1, 2, 3, 5)
    },
    **{
        f"compile_vae_deep_cache_{n}": {
            "dtype": "float16",
            "optimize": {"channels_last": True, "fuse_qkv": True, "compile": "unet+vae", "batch_buckets": [1, 8], "deep_cache": True},
            "request": {"deep_cache_interval": n},
        }
        for n in (1, 2, 3, 5)
    },
    # Regional compile serving interval 3 (gpu_suite.sh deepcache_default_http's candidate), in
    # process: in a Serve replica its 16-row UNet calls timed 0.49-0.71 s, twice an eager step's.
    "compile_regional_deep_cache_3": {
        "dtype": "float16",
        "optimize": {**_REGIONAL, "deep_cache": True},
        "request": {"deep_cache_interval": 3},
    },
    "fp8": {"dtype": "bfloat16", "optimize": {"fp8": True, "fuse_qkv": True}},
    "fp8_cl": {"dtype": "bfloat16", "optimize": {"fp8": True, "fuse_qkv": True, "channels_last": True}},
    "fp8_compile": {
        "dtype": "bfloat16",
        "optimize": {"fp8": True, "fuse_qkv": True, "channels_last": True, "compile": "unet", "batch_buckets": [1, 8]},
    },
    "fp8_compile_vae": {
        "dtype": "bfloat16",
        "optimize": {"fp8": True, "fuse_qkv": True, "channels_last": True, "compile": "unet+vae", "batch_buckets": [1, 8]},
    },
}


def _cuda_time(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, timed with CUDA events (wall clock on CPU)."""
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def _request(args, seed: int, **fields) -> GenerationRequest:
    """A resolved request (every setting given: the engine takes no defaults); `fields` (a
    variant's `request`) override."""
    settings = dict(
        negative_prompt="blurry",
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        deep_cache_interval=1,
        seed=seed,
    )
    return GenerationRequest(prompt="a photo of a lighthouse on a cliff at dusk, detailed, 35mm", **{**settings, **fields})


def stage_times(pipe, batch: int, size: int) -> dict:
    """Seconds of each stage at this batch size: text encoders, one CFG UNet step, VAE decode."""
    device, dtype = pipe.device, pipe.unet.dtype
    prompts = ["a lighthouse"] * batch
    with torch.inference_mode():
        text_s = _cuda_time(lambda: pipe.encode_prompt(prompts, device=device, negative_prompt=prompts), 5)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device=device, negative_prompt=prompts)
        latent = size // 8
        sample = torch.randn(2 * batch, 4, latent, latent, device=device, dtype=dtype)
        hidden = torch.cat([negative, embeds])
        added = {
            "text_embeds": torch.cat([negative_pooled, pooled]),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * (2 * batch), device=device, dtype=dtype),
        }
        # Called exactly as the pipeline calls it (float timestep on the device, same keywords), so
        # a compiled UNet reuses its graph instead of recompiling for the benchmark.
        timestep = torch.tensor(500.0, device=device)

        def step():
            return pipe.unet(
                sample, timestep, encoder_hidden_states=hidden, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=added, return_dict=False,
            )

        step()
        unet_s = _cuda_time(step, 5)
        latents = torch.randn(batch, 4, latent, latent, device=device, dtype=pipe.vae.dtype)
        pipe.vae.decode(latents)
        vae_s = _cuda_time(lambda: pipe.vae.decode(latents), 3)
    scale = (size / 1024) ** 2
    return {
        "text_s": round(text_s, 4),
        "unet_step_s": round(unet_s, 4),
        "vae_decode_s": round(vae_s, 4),
        "unet_tflops": round(CFG_STEP_TFLOP_1024 * scale * batch / unet_s, 1),
    }


def bench_variant(name: str, args) -> dict:
    config = VARIANTS[name]
    optimize = dict(config["optimize"])
    if optimize.get("compile", "off") != "off":
        optimize["compile_cache_dir"] = args.compile_cache
        optimize["batch_buckets"] = sorted(set(args.batches))
        optimize["profile_warmup"] = args.profile_warmup
    if args.smoke:  # the script's logic on the tiny model, on CPU
        spec = TinySpec(device="cpu", dtype="float32", optimize={**optimize, "compile_backend": "eager"})
    else:
        attention = config.get("attention", args.attention)
        spec = SdxlArchSpec(source="sdxl-arch", device="cuda", dtype=config["dtype"], attention=attention, optimize=optimize)
    if torch.cuda.is_available():
        # The variant before's pipeline may still be held in reference cycles: in one eager run
        # each variant's peak grew by ~5 GB (one pipeline's weights) until it was collected.
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # A served replica's warm-up raises dynamo's per-code-object graph limit for what it compiles
    # (a `blocks` compile: a graph per ResNet block and shape); this script compiles on first use.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
    started = time.perf_counter()
    if args.served:
        pipe, engine = None, _served_engine(spec, args)
        if args.replica_threads:
            engine = _ReplicaThreads(engine)
    else:
        pipe = load_pipeline(spec)
        engine = StepEngine(
            pipe,
            max_rows=max(args.batches),
            buckets=spec.optimize.buckets(),
            unguided_bucket=spec.optimize.unguided_bucket,
            deep_cache=deep_cache_unet(pipe.unet, spec.optimize) if spec.optimize.deep_cache else None,
        )
    load_s = time.perf_counter() - started
    try:
        return _measured(name, args, spec, pipe, engine, load_s)
    finally:
        if args.replica_threads:
            engine.close()  # its loop thread holds the pipeline: free the GPU for the next variant


def _measured(name: str, args, spec, pipe, engine, load_s: float) -> dict:
    """One variant's row: its first image, each batch's first call and latency, stage times,
    peak memory and the seed-0 image."""
    config = VARIANTS[name]
    fields = config.get("request", {})
    row: dict = {
        "variant": name,
        "dtype": config["dtype"],
        "attention": spec.attention,
        "optimize": config["optimize"],
        "request": fields,
        "served": args.served,
        "replica_threads": args.replica_threads,
        # with --served: loading, the replica's warm-up (its compiles) and its timed call costs
        "load_s": round(load_s, 1),
    }
    if args.served:
        row["unet_call_s_at_start"] = _call_costs(engine)
        row["unet_call_rounds_s_at_start"] = dict(engine.forward_calls.timing_rounds)
        if args.profile_warmup:
            row["profile"] = engine.startup.get("profile")

    first = time.perf_counter()
    (probe,) = engine.generate([_request(args, seed=0, **fields)])
    row["first_image_s"] = round(time.perf_counter() - first, 2)  # includes compile when on
    row["batches"], row["stages"] = {}, {}
    requests = {batch: [_request(args, seed=i, **fields) for i in range(batch)] for batch in args.batches}
    for batch in args.batches:
        warm_up = time.perf_counter()
        engine.generate(requests[batch])  # warm-up (compiles this bucket)
        # includes this bucket's compile when on
        row["batches"][batch] = {"first_call_s": round(time.perf_counter() - warm_up, 2)}
    if spec.optimize.buckets():
        _off_this_thread(args, lambda: engine.time_buckets(_request(args, seed=0)))
        row["unet_call_s"] = _call_costs(engine)
    for batch in args.batches:
        repeats = 3 if batch <= 4 else 2
        latency = _cuda_time(lambda: engine.generate(requests[batch]), repeats)
        row["batches"][batch].update(latency_s=round(latency, 3), img_per_s=round(batch / latency, 3))
        print(f"  {name} batch {batch}: {latency:.3f} s, {batch / latency:.3f} img/s", flush=True)
    if not args.no_stages:
        row["stages"] = {batch: stage_times(pipe, batch, args.size) for batch in sorted({1, max(args.batches)})}
    row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    if torch.cuda.is_available():  # to compare with a Serve replica's (bench_http.py's `cuda_allocator`)
        row["cuda_allocator"] = cuda_allocator_counts(torch.cuda.memory_stats())
    row["image"] = probe.image
    return row  # the pipeline goes with this frame, freeing the GPU for the next variant


def _served_engine(spec, args) -> StepEngine:
    """The engine a Serve replica builds for `spec`, without Ray: `EngineFactory`'s warm-up and
    timed call costs, and the LoRA slot layers of the default `loras` config (none active)."""
    loras = LorasConfig(dir=str(args.out / "loras")).model_dump(mode="json")
    factory = EngineFactory(spec.model_dump(mode="json"), {"max_batch_size": max(args.batches)}, loras=loras)
    return _off_this_thread(args, factory)


def _off_this_thread(args, fn):
    """`fn()`, on a thread of its own with `--replica-threads` (as a replica's constructor and
    its warm-up run on Serve's user-code thread), else here."""
    if not args.replica_threads:
        return fn()
    results = []
    thread = threading.Thread(target=lambda: results.append(fn()), name="replica-constructor")
    thread.start()
    thread.join()
    if not results:
        raise RuntimeError("the call on the constructor's thread failed (its traceback is above)")
    return results[0]


class _ReplicaThreads:
    """A served engine whose loop runs on its own thread, as `EngineReplica` runs it: `generate`
    submits and waits for the outcomes instead of stepping on the caller's thread."""

    def __init__(self, engine: StepEngine):
        self._engine = engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=engine.run, args=(self._stop,), name="step-engine", daemon=True)
        self._thread.start()

    def generate(self, requests: list) -> list:
        controls = [self._engine.submit(request) for request in requests]
        return [control.wait() for control in controls]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def _call_costs(engine: StepEngine) -> dict[int, float]:
    """Seconds of one UNet call per compiled size (rows), as the engine timed them."""
    return {rows: round(seconds, 4) for rows, seconds in engine.forward_calls.costs.items()}


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="baseline,cl_qkv,bf16", help=f"comma list of {sorted(VARIANTS)}")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0,
                        help="guidance_scale of every request; ≤ 1 runs one UNet row a step (few-step models)")
    parser.add_argument("--scheduler", default="euler", help="scheduler of every request (e.g. lcm, tcd, euler_a)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "auto"],
                        help="attention kernel of variants that name none")
    parser.add_argument("--compile-cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "sdxl-compile"))
    parser.add_argument("--reference", type=Path, help="a .npy fp16 baseline image (seed 0) to compare against")
    parser.add_argument("--save-reference", action="store_true",
                        help="write the baseline's seed-0 image to OUT/baseline_seed0.npy for later --reference runs")
    parser.add_argument("--smoke", action="store_true", help="check the script on the tiny model on CPU")
    parser.add_argument("--tag", default=None, help="name of the JSON file (default: the variants)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage timings")
    parser.add_argument("--served", action="store_true",
                        help="build each engine as a Serve replica does (EngineFactory: warm-up, timed call costs, "
                        "the default LoRA slot layers), without Ray; needs --no-stages")
    parser.add_argument("--replica-threads", action="store_true",
                        help="with --served: build the engine on a thread of its own and run its loop on another, "
                        "as a Serve replica does, instead of on this thread")
    parser.add_argument("--profile-warmup", action="store_true",
                        help="with --served: profile one UNet call per bucket after the warm-up (optimize.profile_warmup), "
                        "to compare kernel by kernel with a Serve replica's (bench_http.py records its `profile`)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.replica_threads and not args.served:
        parser.error("--replica-threads needs --served")
    if args.profile_warmup and not args.served:
        parser.error("--profile-warmup needs --served (the warm-up is the served engine's)")
    if args.served and not args.no_stages:
        parser.error("--served needs --no-stages (the stage timings call the pipeline's modules directly)")
    if args.smoke:
        args.size, args.steps = 64, 2
    args.out.mkdir(parents=True, exist_ok=True)

    report = {
        "benchmark": "bench_pipeline",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": _versions(),
        "settings": {
            "size": args.size, "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler,
            "attention": args.attention,
        },
        "rows": [],
    }
    rows = report["rows"]
    path = args.out / ("bench_pipeline_" + (args.tag or args.variants.replace(",", "_")) + ".json")
    reference = np.load(args.reference) if args.reference and args.reference.exists() else None
    for name in args.variants.split(","):
        print(f"variant {name}", flush=True)
        try:
            row = bench_variant(name, args)
        except Exception as exc:  # one broken variant (e.g. fp8 without torchao) must not lose the rest
            print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
        else:
            image = row.pop("image")
            if name == "baseline":
                reference = image
                if args.save_reference:
                    np.save(args.out / "baseline_seed0.npy", image)
            row["psnr_vs_baseline_db"] = None if reference is None else round(psnr(image, reference), 2)
            rows.append(row)
        # After every variant, so a run cut short keeps what it measured.
        path.write_text(json.dumps(report, indent=2, default=str))

    print(f"\n{'variant':<14}{'batch':>6}{'latency s':>11}{'img/s':>8}{'unet step s':>13}{'TFLOP/s':>9}{'vae s':>8}{'peak GiB':>10}{'PSNR dB':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<14} failed: {row['error']}")
            continue
        for batch, numbers in row["batches"].items():
            stage = row["stages"].get(batch, {})
            print(
                f"{row['variant']:<14}{batch:>6}{numbers['latency_s']:>11.3f}{numbers['img_per_s']:>8.3f}"
                f"{stage.get('unet_step_s', float('nan')):>13.4f}{stage.get('unet_tflops', float('nan')):>9}"
                f"{stage.get('vae_decode_s', float('nan')):>8.3f}{row['peak_memory_gib']!s:>10}{row['psnr_vs_baseline_db']!s:>9}"
            )
        print(f"{'':<14}load {row['load_s']} s, first image {row['first_image_s']} s")
    print(f"wrote {path}")


def _versions() -> dict:
    versions = {"torch": torch.__version__}
    for package in ("diffusers", "transformers", "torchao", "xformers"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    return versions


if __name__ == "__main__":
    main()
