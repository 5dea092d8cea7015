"""Typed model specs: which weights a GPU deployment loads and how.

Pure pydantic, so the ingress (which must stay free of torch) and the engines share one definition.
A spec is a discriminated union on ``source``; each variant forbids the fields that do not apply to
it, so a field is never accepted and then ignored.
"""

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from configs.schedulers import canonical_scheduler

#: Folders of diffusers-layout models shipped in this package: configs, and for the tiny family
#: the trained weights too.
MODEL_CONFIG_ROOT = Path(__file__).resolve().parent / "models"
#: The trained tiny base model, its canny ControlNet and the folder of its example LoRAs.
TINY_MODEL_DIR = MODEL_CONFIG_ROOT / "tiny"
TINY_CONTROLNET_CANNY_DIR = MODEL_CONFIG_ROOT / "tiny-controlnet-canny"
TINY_LORA_DIR = Path(__file__).resolve().parent / "loras"

Dtype = Literal["float32", "float16", "bfloat16"]
#: The largest deep-cache interval (steps between the UNet's full passes): the bound of a request's
#: `deep_cache_interval` and of a deployment's `default_deep_cache_interval` alike.
MAX_DEEP_CACHE_INTERVAL = 10

# Fields the base, ControlNet and refiner specs declare alike, defined once.
WeightsVariant = Annotated[Optional[str], Field(description="Weight file variant, e.g. `fp16`.")]
LocalFilesOnly = Annotated[
    bool, Field(description="Never reach the hub: load only what is on disk or in the HF cache.")
]
CheckpointPath = Annotated[str, Field(min_length=1, description="Path or URL of the `.safetensors` checkpoint.")]
RandomWeightsSeed = Annotated[int, Field(ge=0, le=2**31 - 1, description="Seed of the random weights.")]


class OptimizeConfig(BaseModel):
    """Speed switches of a GPU pipeline. Each is measured in BENCHMARKS.md; all default off except
    where a benchmark showed a gain at ≥ 40 dB PSNR against the unoptimized fp16 image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels_last: bool = Field(False, description="UNet in channels-last memory format.")
    fuse_qkv: bool = Field(False, description="Fuse attention q/k/v projections into one matmul (diffusers).")
    compile: Literal["off", "unet", "unet+vae"] = Field(
        "off", description="torch.compile the UNet (and the VAE decoder); warmed up at load, per batch bucket."
    )
    compile_scope: Literal["full", "regional", "blocks"] = Field(
        "full",
        description=(
            "What of the UNet `compile` compiles: `full`, the whole UNet as one graph; `regional`, "
            "each transformer block (diffusers' `compile_repeated_blocks`, fullgraph): the repeated "
            "block compiles once and is reused, so a cold start compiles far less, and the ResNets and "
            "up/down samplers between blocks run eager; `blocks`, each transformer block, ResNet block "
            "and up/down sampler (fullgraph), blocks of one shape sharing a graph, the glue between "
            "them eager. With `unet+vae` the VAE decoder is compiled whole, except under `blocks`, "
            "which compiles its ResNet blocks and upsamplers."
        ),
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = Field(
        "default", description="torch.compile mode; `reduce-overhead` adds CUDA graphs (fixed shapes)."
    )
    compile_backend: Literal["inductor", "eager"] = Field(
        "inductor", description="torch.compile backend; `eager` only traces (checks the path in tests, debugging)."
    )
    compile_dynamic: bool = Field(
        False,
        description=(
            "Compile with dynamic shapes (torch.compile dynamic=True: batch and image sizes symbolic): one "
            "graph for every size. On full-size SDXL its cold compile had not finished after 9.5 minutes on "
            "an H200 (static buckets: ~110 s for the first), so it suits small models only."
        ),
    )
    compile_cache_dir: Optional[str] = Field(
        None,
        description=(
            "Persistent compile cache (inductor FX graph and autotune caches); a warm restart loads "
            "compiled kernels instead of recompiling. Default: `<state_dir>/compile`."
        ),
    )
    batch_buckets: Optional[list[int]] = Field(
        None,
        description=(
            "Pad fused groups up to the next of these sizes (e.g. [1, 2, 4, 8]) so compiled graphs "
            "are reused; padded rows are discarded. Needs `compile`; default with compile (not "
            "dynamic): [1, 2, 4, 8]."
        ),
    )
    vae_slicing: bool = Field(False, description="Decode a batch one image at a time (less memory, slower).")
    vae_tiling_above_pixels: Optional[int] = Field(
        1024 * 1024,
        ge=0,
        description=(
            "VAE encodes and decodes of images above this many pixels run in overlapping tiles of the "
            "VAE's `sample_size` (diffusers' tiling): bounded memory for 2048² images, seams blended. "
            "Null: never tiled."
        ),
    )
    fp8: bool = Field(
        False,
        description="Opt-in float8 (torchao dynamic activation + weight) for the UNet's linear layers; Hopper or newer.",
    )
    warmup_sizes: list[tuple[int, int]] = Field(
        [],
        max_length=8,
        description=(
            "Image sizes [width, height] compiled at warm-up besides the model's default size, e.g. "
            "[[2048, 2048]] where hires requests are served: a compiled graph exists per latent shape, "
            "so without it the first request at a new size compiles (minutes on an H200). Each size "
            "is compiled at every batch bucket and branch (LoRA, ControlNet); needs `compile`."
        ),
    )

    deep_cache: bool = Field(
        False,
        description=(
            "Serve requests' `deep_cache_interval` (DeepCache-style reuse of the UNet's deep features "
            "between steps; the base deployment only). Every full UNet step then runs a pass that "
            "also returns the deep features (the same prediction); with `compile` that pass is "
            "compiled instead of the UNet, and the shallow branch besides it, per bucket and branch. "
            "Off: such requests are a 400 `deep_cache_disabled`."
        ),
    )
    unguided_bucket: bool = Field(
        False,
        description=(
            "Add a UNet call of one row to the compiled sizes: a row with guidance ≤ 1 (few-step "
            "models, or past `guidance_end`) is one UNet row, which without it pads to the two rows "
            "of a guided image. Costs one more compiled graph per branch and warm-up size at "
            "warm-up; needs `compile` with batch buckets (not `compile_dynamic` alone)."
        ),
    )

    cuda_graphs: bool = Field(
        False,
        description=(
            "Replay the UNet calls of the smallest batch bucket (a lone image's calls: two UNet rows "
            "when guided, one unguided) from CUDA graphs, one per call shape and pass, captured at "
            "warm-up: a lone request's call is then one launch, where the host launching a compiled "
            "UNet's kernels one by one kept the device waiting. Calls with a LoRA or a ControlNet run "
            "as before. Needs `compile` with batch buckets and a CUDA device; not with `compile_mode` "
            "`reduce-overhead` (which graphs the compiled UNet itself)."
        ),
    )
    profile_warmup: bool = Field(
        False,
        description=(
            "After the warm-up's timing, run one UNet call per bucket under torch.profiler and keep "
            "a summary (wall and device seconds, the kernels and host ops that took longest) in the "
            "replica's model info (`profile`): to compare a replica's calls with the same engine's in "
            "a plain process. Needs `compile` (the warm-up)."
        ),
    )

    @field_validator("batch_buckets")
    @classmethod
    def _sorted_positive(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and (not value or sorted(set(value)) != value or value[0] < 1):
            raise ValueError(f"batch_buckets {value!r} must be increasing positive sizes")
        return value

    @field_validator("warmup_sizes")
    @classmethod
    def _multiples_of_8(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for width, height in value:
            if width < 64 or height < 64 or width % 8 or height % 8:
                raise ValueError(f"warmup_sizes entry {[width, height]!r} must be two multiples of 8, each at least 64")
        return value

    @model_validator(mode="after")
    def _compile_options_need_compile(self) -> "OptimizeConfig":
        # Only compiled graphs have a scope or are shape-specific: on an eager pipeline these
        # settings would be accepted and ignored.
        if self.compile_scope != "full" and self.compile == "off":
            raise ValueError(f"compile_scope {self.compile_scope!r} needs compile 'unet' or 'unet+vae'")
        if self.warmup_sizes and self.compile == "off":
            raise ValueError(f"warmup_sizes {self.warmup_sizes!r} needs compile 'unet' or 'unet+vae'")
        if self.profile_warmup and self.compile == "off":
            raise ValueError("profile_warmup needs compile 'unet' or 'unet+vae' (it profiles the warm-up's buckets)")
        # Buckets on an eager UNet only pad, and no warm-up times them: the planner's prior (a
        # call costs its padded size) then splits every group into one-image calls and steps one
        # call a step, so the replica served one image at a time (tiny model over HTTP, 4
        # clients: batch 1.0 and 21 of 24 row-steps deferred; without buckets batch 4.0).
        if self.batch_buckets is not None and self.compile == "off":
            raise ValueError(
                f"batch_buckets {self.batch_buckets!r} needs compile 'unet' or 'unet+vae': an eager UNet "
                "runs every batch at its own size"
            )
        if self.cuda_graphs and self.buckets() is None:
            raise ValueError(
                "cuda_graphs needs compile 'unet' or 'unet+vae' with batch buckets (batch_buckets when "
                "compile_dynamic is on): a graph holds one call shape"
            )
        if self.cuda_graphs and self.compile_mode == "reduce-overhead":
            raise ValueError("cuda_graphs graphs whole UNet calls; compile_mode 'reduce-overhead' graphs the compiled UNet already: choose one")
        # A bucket exists only for compiled static shapes: a dynamic graph (or an eager UNet,
        # whose buckets are None: refused above) runs one row at its own size already.
        if self.unguided_bucket and self.buckets() is None:
            raise ValueError(
                "unguided_bucket needs compile 'unet' or 'unet+vae' with batch buckets "
                "(batch_buckets when compile_dynamic is on)"
            )
        return self

    def buckets(self) -> Optional[list[int]]:
        """The batch sizes groups are padded to, or None to run groups at their own size."""
        if self.batch_buckets is not None:
            return self.batch_buckets
        if self.compile != "off" and not self.compile_dynamic:
            return [1, 2, 4, 8]
        return None


class _SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        "sdxl-tiny",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:/-]+$",
        description="Public model id: what `GET /v1/models` lists and what requests name in `model`.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Torch device: `auto` picks `cuda` when available, else `cpu`.",
    )
    dtype: Literal["auto"] | Dtype = Field(
        "auto",
        description="Weights and activations dtype: `auto` is float16 on CUDA and float32 on CPU.",
    )
    attention: Literal["auto", "sdpa", "xformers"] = Field(
        "auto",
        description=(
            "Attention kernel. `auto` uses xformers when it is importable, the device is CUDA and "
            "`optimize.fuse_qkv` is off (diffusers' fused projections run on SDPA), else PyTorch SDPA. "
            "`xformers` fails at load time when it cannot be used."
        ),
    )
    default_size: tuple[int, int] = Field(
        (1024, 1024),
        description="(width, height) used when a request gives no size.",
    )
    default_steps: int = Field(30, ge=1, le=500, description="Denoising steps when a request gives none.")
    default_guidance_scale: float = Field(
        5.0, ge=0.0, le=50.0, description="Classifier-free guidance scale when a request gives none."
    )
    default_scheduler: str = Field("euler", description="Scheduler id when a request gives none.")
    default_deep_cache_interval: int = Field(
        1,
        ge=1,
        le=MAX_DEEP_CACHE_INTERVAL,
        description=(
            "`deep_cache_interval` when a request gives none: above 1, every request this deployment "
            "serves reuses the UNet's deep features between full steps (an approximation: README, "
            "\"Deep-feature caching\") unless it sends 1, and those with `controlnet` or `refiner` "
            "(which deep caching cannot serve) run every step whole. Needs `optimize.deep_cache`."
        ),
    )
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig, description="Speed switches (GPU).")

    @field_validator("default_size")
    @classmethod
    def _size_multiple_of_8(cls, value: tuple[int, int]) -> tuple[int, int]:
        if any(side < 64 or side % 8 for side in value):
            raise ValueError(f"default_size {value!r} must be two multiples of 8, each at least 64")
        return value

    @field_validator("default_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return canonical_scheduler(value)

    @model_validator(mode="after")
    def _deep_cache_default_needs_deep_cache(self) -> "_SpecBase":
        # Without the deep-cache passes the engine refuses every interval above 1: a default above
        # 1 would turn every request that gives none into a 400.
        if self.default_deep_cache_interval > 1 and not self.optimize.deep_cache:
            raise ValueError(
                f"default_deep_cache_interval {self.default_deep_cache_interval} needs optimize.deep_cache: true"
            )
        return self

    @model_validator(mode="after")
    def _one_attention_kernel(self) -> "_SpecBase":
        # diffusers' fused q/k/v projections come with their own SDPA attention processor, which
        # would silently replace xformers': refuse the pair rather than ignore a field.
        if self.attention == "xformers" and self.optimize.fuse_qkv:
            raise ValueError(
                "attention 'xformers' cannot be combined with optimize.fuse_qkv (fused projections run "
                "on PyTorch SDPA); choose one"
            )
        return self


class TinySpec(_SpecBase):
    """The embedded default: a tiny SDXL-architecture model trained on a synthetic world of flat
    shapes (`training/`), shipped in `configs/models/tiny` and loaded with `from_pretrained`, the
    same path real weights take. It draws what it was trained on, on a CPU, and nothing else.
    """

    source: Literal["tiny"] = "tiny"
    default_size: tuple[int, int] = Field((128, 128), description="(width, height) when a request gives none.")
    default_steps: int = Field(20, ge=1, le=500, description="Denoising steps when a request gives none.")


class PretrainedSpec(_SpecBase):
    """Real weights in diffusers layout: a hub id or a local folder (`from_pretrained`)."""

    source: Literal["pretrained"]
    path: str = Field(
        ...,
        min_length=1,
        description="Hub id (e.g. `stabilityai/stable-diffusion-xl-base-1.0`) or a local diffusers folder.",
    )
    variant: WeightsVariant = None
    vae_path: str | None = Field(
        None,
        description="Optional separate VAE (hub id or folder), e.g. `madebyollin/sdxl-vae-fp16-fix`.",
    )
    local_files_only: LocalFilesOnly = False


class SingleFileSpec(_SpecBase):
    """One original-format checkpoint (`.safetensors`), loaded with `from_single_file`."""

    source: Literal["single_file"]
    path: CheckpointPath
    config: str | None = Field(
        None,
        description=(
            "Hub id or local diffusers folder holding the component configs; needed offline, since "
            "otherwise diffusers fetches the configs from the hub."
        ),
    )
    vae_path: str | None = Field(None, description="Optional separate VAE (hub id or folder).")
    local_files_only: LocalFilesOnly = False


class SdxlArchSpec(_SpecBase):
    """Full-size SDXL architecture (public configs) with random weights: real cost, noise images.

    For GPU benchmarks only; built directly on the device, never saved.
    """

    name: str = Field(
        "sdxl-arch", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$", description="Public model id."
    )
    source: Literal["sdxl-arch"]
    seed: RandomWeightsSeed = 0


ModelSpec = Annotated[
    Union[TinySpec, PretrainedSpec, SingleFileSpec, SdxlArchSpec],
    Field(discriminator="source"),
]


# --- ControlNets -------------------------------------------------------------------------------

#: The ControlNets shipped with the tiny family, by the map they follow.
TINY_CONTROLNET_DIRS = {"canny": TINY_CONTROLNET_CANNY_DIR, "silhouette": MODEL_CONFIG_ROOT / "tiny-controlnet-silhouette"}


class _ControlNetSpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyControlNetSpec(_ControlNetSpecBase):
    """A ControlNet of the trained tiny family, shipped in `configs/models` (for the tiny base)."""

    source: Literal["tiny"] = "tiny"
    map: Literal["canny", "silhouette"] = Field(
        "canny",
        description="Which shipped tiny ControlNet: the map it follows (canny edges, or the shape's area white on black).",
    )


class PretrainedControlNetSpec(_ControlNetSpecBase):
    """A ControlNet in diffusers layout: a hub id or a local folder (`ControlNetModel.from_pretrained`)."""

    source: Literal["pretrained"]
    path: str = Field(..., min_length=1, description="Hub id (e.g. `diffusers/controlnet-canny-sdxl-1.0`) or a local folder.")
    variant: WeightsVariant = None
    local_files_only: LocalFilesOnly = False


class SingleFileControlNetSpec(_ControlNetSpecBase):
    """One original-format ControlNet checkpoint (`ControlNetModel.from_single_file`)."""

    source: Literal["single_file"]
    path: CheckpointPath
    config: str | None = Field(
        None, description="Hub id or local folder holding the ControlNet's `config.json`; needed offline."
    )
    local_files_only: LocalFilesOnly = False


class SdxlArchControlNetSpec(_ControlNetSpecBase):
    """The public SDXL ControlNet architecture with random weights (GPU benchmarks only)."""

    source: Literal["sdxl-arch"]
    seed: RandomWeightsSeed = 0


ControlNetSpec = Annotated[
    Union[TinyControlNetSpec, PretrainedControlNetSpec, SingleFileControlNetSpec, SdxlArchControlNetSpec],
    Field(discriminator="source"),
]



# --- Refiners ----------------------------------------------------------------------------------

#: The refiner of the tiny family: its UNet and scheduler; the VAE and second text encoder are the
#: tiny base's, shared as SDXL's refiner shares the base's.
TINY_REFINER_DIR = MODEL_CONFIG_ROOT / "tiny-refiner"


class _RefinerSpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyRefinerSpec(_RefinerSpecBase):
    """The trained tiny refiner shipped in `configs/models/tiny-refiner` (for the tiny base)."""

    source: Literal["tiny"] = "tiny"


class PretrainedRefinerSpec(_RefinerSpecBase):
    """A refiner pipeline in diffusers layout (`StableDiffusionXLImg2ImgPipeline.from_pretrained`)."""

    source: Literal["pretrained"]
    path: str = Field(
        ..., min_length=1, description="Hub id (e.g. `stabilityai/stable-diffusion-xl-refiner-1.0`) or a local folder."
    )
    variant: WeightsVariant = None
    local_files_only: LocalFilesOnly = False


class SingleFileRefinerSpec(_RefinerSpecBase):
    """One original-format refiner checkpoint (`StableDiffusionXLImg2ImgPipeline.from_single_file`)."""

    source: Literal["single_file"]
    path: CheckpointPath
    config: str | None = Field(
        None, description="Hub id or local folder of the refiner's diffusers configs; needed offline."
    )
    local_files_only: LocalFilesOnly = False


class SdxlArchRefinerSpec(_RefinerSpecBase):
    """The public SDXL refiner architecture with random weights (GPU benchmarks only)."""

    source: Literal["sdxl-arch"]
    seed: RandomWeightsSeed = 0


RefinerSpec = Annotated[
    Union[TinyRefinerSpec, PretrainedRefinerSpec, SingleFileRefinerSpec, SdxlArchRefinerSpec],
    Field(discriminator="source"),
]
