"""Building and loading SDXL pipelines from a model spec. Knows diffusers and torch, not Ray.

Every source ends in the same object, a `StableDiffusionXLPipeline` on the spec's device and
dtype. The tiny default is a trained model shipped as a diffusers folder and loaded with
`from_pretrained`, so the path real weights take is the path the tests exercise. Random weights
(`build_random_pipeline`) serve the full-size benchmarks and the start of training.
"""

import functools
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    SchedulerMixin,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from configs.model_spec import (
    MODEL_CONFIG_ROOT,
    TINY_CONTROLNET_DIRS,
    TINY_MODEL_DIR,
    TINY_REFINER_DIR,
    ControlNetSpec,
    PretrainedControlNetSpec,
    SdxlArchControlNetSpec,
    SingleFileControlNetSpec,
    TinyControlNetSpec,
    PretrainedRefinerSpec,
    PretrainedSpec,
    RefinerSpec,
    SdxlArchRefinerSpec,
    SdxlArchSpec,
    SingleFileRefinerSpec,
    SingleFileSpec,
    TinyRefinerSpec,
    TinySpec,
)
from configs.schedulers import SCHEDULERS
from deployments.optimize import apply_optimizations

logger = logging.getLogger(__name__)

AnySpec = Union[TinySpec, PretrainedSpec, SingleFileSpec, SdxlArchSpec]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: scheduler id -> (diffusers class, overrides applied on top of the model's own scheduler config).
_SCHEDULER_FACTORIES: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
    # Both step with the row's generator (LCM re-noises between steps). TCD's `eta` (the paper's
    # gamma) is the SDXL pipelines' default, 0.0: deterministic steps, as a plain diffusers call
    # without `eta` runs them (`RowFactory.prepare`'s step kwargs), not the 0.3 of TCD's docs.
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}
if set(_SCHEDULER_FACTORIES) != set(SCHEDULERS):  # the public list and the factories must agree
    raise RuntimeError("configs.schedulers.SCHEDULERS and _SCHEDULER_FACTORIES disagree")


def make_scheduler(scheduler_id: str, base_config: Any, timestep_spacing: Optional[str] = None) -> SchedulerMixin:
    """A fresh scheduler of the given id, keeping the model's own betas, offset and (unless
    `timestep_spacing` overrides it) spacing, as diffusers' `from_config(config, timestep_spacing=...)`
    makes it. LCM and TCD would keep the override in their config without reading it (their
    timesteps come from their distillation schedule), so requests refuse the pair
    (`GenerationRequest._check_distilled_schedule`)."""
    cls, overrides = _SCHEDULER_FACTORIES[scheduler_id]
    if timestep_spacing is not None:
        overrides = {**overrides, "timestep_spacing": timestep_spacing}
    # `from_config` ignores the keys no argument of the class takes, with a warning for each: a
    # log line per LCM or TCD row, since they are not registered as compatible with SDXL's Euler
    # config and do not take its `skip_prk_steps`. Dropped here instead, to the same effect.
    accepted = _init_arguments(cls)
    config = {key: value for key, value in base_config.items() if key in accepted or key.startswith("_")}
    return cls.from_config(config, **overrides)


@functools.cache
def _init_arguments(cls: type[SchedulerMixin]) -> frozenset[str]:
    """The argument names of `cls.__init__`. Cached by class: every admitted row makes its own
    scheduler, and inspecting the signature each time would repeat the same work (a class's
    signature does not change)."""
    return frozenset(inspect.signature(cls.__init__).parameters)


def resolve_device(spec: AnySpec) -> torch.device:
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec.device)


def resolve_dtype(spec: AnySpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec.dtype]


def load_pipeline(spec: AnySpec) -> StableDiffusionXLPipeline:
    """Load (or build) the spec's pipeline on its device and dtype, with its attention backend."""
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    if isinstance(spec, TinySpec):
        pipe = StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR, dtype=dtype)
    elif isinstance(spec, PretrainedSpec):
        extra = {"vae": _load_vae(spec.vae_path, dtype, spec.local_files_only)} if spec.vae_path else {}
        pipe = StableDiffusionXLPipeline.from_pretrained(
            spec.path,
            dtype=dtype,
            variant=spec.variant,
            use_safetensors=True,
            local_files_only=spec.local_files_only,
            **extra,
        )
    elif isinstance(spec, SingleFileSpec):
        extra = {"vae": _load_vae(spec.vae_path, dtype, spec.local_files_only)} if spec.vae_path else {}
        pipe = StableDiffusionXLPipeline.from_single_file(
            spec.path,
            config=spec.config,
            dtype=dtype,
            local_files_only=spec.local_files_only,
            **extra,
        )
    elif isinstance(spec, SdxlArchSpec):
        pipe = build_random_pipeline(MODEL_CONFIG_ROOT / "sdxl-arch", spec.seed, device, dtype)
    else:  # pragma: no cover - the discriminated union admits nothing else
        raise TypeError(f"unsupported model spec {type(spec).__name__}")
    check_served_unet(pipe.unet.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    backend = set_attention_backend(pipe, spec.attention, device, fused_qkv=spec.optimize.fuse_qkv)
    applied = apply_optimizations(pipe, spec.optimize, device)
    logger.info("pipeline %r on %s/%s, attention %s, optimizations %s", spec.name, device, dtype, backend, applied or "none")
    return pipe


def check_served_unet(config: Any) -> None:
    """Refuse UNets the step engine would run wrongly without an error. A guidance-distilled
    UNet (`time_cond_proj_dim`, e.g. the full LCM-SDXL UNet) takes the guidance scale as an
    embedding (diffusers' `timestep_cond`), which the engine's shared forward does not pass."""
    if config.get("time_cond_proj_dim") is not None:
        raise ValueError(
            f"the UNet takes a guidance embedding (time_cond_proj_dim={config['time_cond_proj_dim']!r}), which this "
            "server does not pass; serve the base model with the LCM-LoRA instead (README, \"Few-step models\")"
        )


def load_controlnet(spec: ControlNetSpec, device: torch.device, dtype: torch.dtype) -> ControlNetModel:
    """Load (or build) a ControlNet on the base pipeline's device and dtype."""
    if isinstance(spec, TinyControlNetSpec):
        net = ControlNetModel.from_pretrained(TINY_CONTROLNET_DIRS[spec.map], dtype=dtype)
    elif isinstance(spec, PretrainedControlNetSpec):
        net = ControlNetModel.from_pretrained(
            spec.path, dtype=dtype, variant=spec.variant, use_safetensors=True, local_files_only=spec.local_files_only
        )
    elif isinstance(spec, SingleFileControlNetSpec):
        net = ControlNetModel.from_single_file(
            spec.path, config=spec.config, dtype=dtype, local_files_only=spec.local_files_only
        )
    elif isinstance(spec, SdxlArchControlNetSpec):
        torch.manual_seed(spec.seed)
        with torch.device(device):
            net = ControlNetModel.from_config(_read_json(MODEL_CONFIG_ROOT / "sdxl-arch-controlnet" / "config.json"))
        net = net if dtype == torch.float32 else net.to(dtype=dtype)
    else:  # pragma: no cover - the discriminated union admits nothing else
        raise TypeError(f"unsupported ControlNet spec {type(spec).__name__}")
    return net.to(device).eval()


def load_refiner(spec: RefinerSpec, base: AnySpec) -> StableDiffusionXLImg2ImgPipeline:
    """Load (or build) a refiner pipeline on the base spec's device and dtype, with its attention
    backend. The base's speed switches (`optimize`) are the base deployment's only."""
    device = resolve_device(base)
    dtype = resolve_dtype(base, device)
    if isinstance(spec, TinyRefinerSpec):
        # The refiner folder holds its UNet and scheduler; the VAE, second text encoder and its
        # tokenizer are the base's (as SDXL's refiner ships copies of the base's).
        shared = StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR, unet=None, text_encoder=None, tokenizer=None, dtype=dtype)
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            TINY_REFINER_DIR, text_encoder_2=shared.text_encoder_2, tokenizer_2=shared.tokenizer_2, vae=shared.vae, dtype=dtype
        )
    elif isinstance(spec, PretrainedRefinerSpec):
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            spec.path, dtype=dtype, variant=spec.variant, use_safetensors=True, local_files_only=spec.local_files_only
        )
    elif isinstance(spec, SingleFileRefinerSpec):
        pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(
            spec.path, config=spec.config, dtype=dtype, local_files_only=spec.local_files_only
        )
    elif isinstance(spec, SdxlArchRefinerSpec):
        pipe = build_random_refiner(MODEL_CONFIG_ROOT / "sdxl-arch-refiner", MODEL_CONFIG_ROOT / "sdxl-arch", spec.seed, device, dtype)
    else:  # pragma: no cover - the discriminated union admits nothing else
        raise TypeError(f"unsupported refiner spec {type(spec).__name__}")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    set_attention_backend(pipe, base.attention, device)
    return pipe


def build_random_refiner(
    config_dir: Path, shared_dir: Path, seed: int, device: torch.device, dtype: torch.dtype
) -> StableDiffusionXLImg2ImgPipeline:
    """A refiner with the UNet architecture of `config_dir` and the VAE and second text encoder
    of `shared_dir` (SDXL's refiner uses the base's), random weights from `seed`."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(_read_json(Path(config_dir) / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(_read_json(Path(shared_dir) / "vae" / "config.json"))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(Path(shared_dir) / "text_encoder_2" / "config.json"))
    scheduler = EulerDiscreteScheduler.from_config(_read_json(Path(shared_dir) / "scheduler" / "scheduler_config.json"))
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=byte_level_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _load_vae(path: str, dtype: torch.dtype, local_files_only: bool) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(path, dtype=dtype, local_files_only=local_files_only)


def set_attention_backend(
    pipe: StableDiffusionXLPipeline, choice: str, device: torch.device, fused_qkv: bool = False
) -> str:
    """Switch to xformers when asked (or on `auto` when usable); otherwise keep PyTorch SDPA.

    Returns the backend in use. xformers cannot run on CPU, so `auto` never picks it there; nor
    with fused q/k/v projections, whose attention processor is SDPA's (the spec refuses an explicit
    `xformers` with them).
    """
    if choice == "sdpa" or (choice == "auto" and fused_qkv):
        return "sdpa"
    usable = device.type == "cuda" and _xformers_importable()
    if choice == "xformers" and not usable:
        raise ValueError(
            f"attention 'xformers' needs the xformers package and a CUDA device (device is {device})"
        )
    if usable:
        pipe.enable_xformers_memory_efficient_attention()
        return "xformers"
    return "sdpa"


def _xformers_importable() -> bool:
    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    return True


# --- random-weight models from config files -------------------------------------------------


def byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (no merges), built offline.

    Every text tokenizes (one token per character), ids stay below 514, and `<|endoftext|>` has the
    highest id so CLIP's legacy pooling (argmax of ids) lands on it as with the real vocabulary.
    """
    byte_chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for char in byte_chars:
        vocab[char] = len(vocab)
    for char in byte_chars:
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _bytes_to_unicode() -> list[str]:
    # CLIP's reversible byte -> printable-unicode table, in CLIP's order.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def build_random_pipeline(
    config_dir: Path, seed: int, device: torch.device, dtype: torch.dtype
) -> StableDiffusionXLPipeline:
    """An SDXL pipeline with the architecture of `config_dir` and random weights from `seed`.

    Components are created directly on `device` (no CPU round trip for full-size models) in a fixed
    order after one `manual_seed`, so the same seed gives the same weights on the same device.
    """
    config_dir = Path(config_dir)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(_read_json(config_dir / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(_read_json(config_dir / "vae" / "config.json"))
        text_encoder = CLIPTextModel(_clip_config(config_dir / "text_encoder" / "config.json"))
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_config(config_dir / "text_encoder_2" / "config.json")
        )
    scheduler = EulerDiscreteScheduler.from_config(
        _read_json(config_dir / "scheduler" / "scheduler_config.json")
    )
    tokenizer = byte_level_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    # Random init runs in float32; cast only when asked (the cast logs a diffusers notice).
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _clip_config(path: Path) -> CLIPTextConfig:
    raw = _read_json(path)
    raw.pop("architectures", None)
    raw.pop("torch_dtype", None)
    raw.pop("transformers_version", None)
    return CLIPTextConfig(**raw)
