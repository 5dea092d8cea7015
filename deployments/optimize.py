"""Speed switches applied to a loaded pipeline (`ModelSpec.optimize`). Knows torch, not Ray.

Order matters: projections are fused first, so float8 then quantizes the fused layers (fusing after
float8 would concatenate float8 weights, which torchao refuses); memory formats come next, and
compilation last so it sees the final modules. Compilation is in place (`Module.compile`),
so the per-call pipeline objects of every kind share the compiled UNet.
"""

import logging
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from configs.model_spec import OptimizeConfig
from configs.paths import default_cache_dir, private_dir
from deployments.engine.deep_cache import DeepCacheUNet

logger = logging.getLogger(__name__)


def apply_optimizations(pipe: DiffusionPipeline, options: OptimizeConfig, device: torch.device) -> list[str]:
    """Apply the switches that are on; return their names (logged and reported by the engine)."""
    applied = []
    if options.fuse_qkv:
        pipe.fuse_qkv_projections()
        applied.append("fuse_qkv")
    if options.fp8:
        _float8(pipe, device)
        applied.append("fp8")
    if options.channels_last:
        # UNet only: on an H100 the VAE decoder ran slower channels-last (BENCHMARKS.md).
        pipe.unet.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if options.vae_slicing:
        pipe.vae.enable_slicing()
        applied.append("vae_slicing")
    if options.compile != "off":
        cache = use_compile_cache(options.compile_cache_dir)
        compile_args = _compile_args(options)
        if options.compile_scope == "regional":
            # Every BasicTransformerBlock (SDXL's 70) compiled from one traced code object: dynamo
            # reuses the graph across blocks of one width, and fullgraph refuses a graph break
            # instead of silently splitting the block.
            pipe.unet.compile_repeated_blocks(fullgraph=True, **compile_args)
        elif options.compile_scope == "blocks":
            compile_blocks(pipe.unet, compile_args)
        else:
            pipe.unet.compile(**compile_args)
        applied.append(f"compile:unet:{options.compile_scope}({options.compile_mode},{options.compile_backend})")
        if options.compile == "unet+vae":
            if options.compile_scope == "blocks":
                compile_blocks(pipe.vae.decoder, compile_args)
            else:
                pipe.vae.decoder.compile(**compile_args)
            applied.append("compile:vae")
        logger.info("torch.compile cache in %s", cache)
    return applied


#: What `compile_scope: blocks` compiles, by class: regional compilation's transformer blocks and
#: the ResNet blocks and samplers between them, where the whole-UNet graph's gain at 16 rows was
#: (H200: regional alone served at the eager rate under load, BENCHMARKS.md). Modules of one class
#: share a traced `forward`: instances of one shape reuse a graph, so SDXL compiles a few dozen
#: small graphs per latent shape where the whole UNet is one large one. Measured (H200, `unet+vae`,
#: buckets [1, 8]): 0.995 img/s at batch 8 against full compile's 1.02-1.05, both buckets compiled
#: in 131 s against ~4.5 min, but a lone image 1.8-2.3 s against 1.2 (a dynamo entry per block call).
BLOCK_CLASSES = ("BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def compile_blocks(model: torch.nn.Module, compile_args: dict) -> None:
    """Compile each of `model`'s `BLOCK_CLASSES` modules (fullgraph: a graph break fails instead
    of splitting the block); what lies between them runs eager."""
    blocks = [module for module in model.modules() if type(module).__name__ in BLOCK_CLASSES]
    if not blocks:
        raise ValueError(f"compile_scope 'blocks' found none of {BLOCK_CLASSES} in {type(model).__name__}")
    for block in blocks:
        block.compile(fullgraph=True, **compile_args)


def deep_cache_unet(unet: torch.nn.Module, options: OptimizeConfig) -> DeepCacheUNet:
    """The UNet's two deep-cache passes (`optimize.deep_cache`), compiled as the UNet is: with
    `compile_scope: full` each pass is a graph of its own (per shape, as the UNet's); with
    `regional` or `blocks` the blocks they call are the UNet's compiled ones already."""
    passes = DeepCacheUNet(unet)
    if options.compile != "off" and options.compile_scope == "full":
        passes.compile(**_compile_args(options))
    return passes


def _compile_args(options: OptimizeConfig) -> dict:
    return dict(
        mode=None if options.compile_mode == "default" else options.compile_mode,
        backend=options.compile_backend,
        dynamic=True if options.compile_dynamic else False,
    )


def use_compile_cache(cache_dir: str | None) -> Path:
    """Point inductor's (and Triton's) on-disk caches at one folder that outlives the process, so a
    restarted replica reuses compiled kernels instead of compiling again."""
    path = private_dir(Path(cache_dir) if cache_dir else default_cache_dir() / "compile")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return path


def compile_cache_counts() -> dict[str, int]:
    """This process's compile-cache lookups so far: inductor's FX graph cache and AOTAutograd's.
    Across a replica's warm-up, hits and no misses mean a warm start (nothing recompiled)."""
    from torch._dynamo.utils import counters

    names = {
        "inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
        "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss"),
    }
    return {name: int(counters[group][name]) for group, group_names in names.items() for name in group_names}


def _float8(pipe: DiffusionPipeline, device: torch.device) -> None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"optimize.fp8 needs a CUDA GPU of compute capability 8.9 or newer (device is {device})")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise ValueError(f"optimize.fp8 needs the torchao package ({exc})") from None
    quantize_(pipe.unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
