"""The contract between the ingress and the engines: requests, results and typed errors.

One `GenerationRequest` is one image. It is what the HTTP ingress sends through a
`DeploymentHandle`, what other Ray apps send directly, and what a job stores. Nothing heavy
lives here: pydantic, dataclasses and numpy only, so both sides import it cheaply.

The request fields are defined once, below, as annotated types (bounds and docs together); the
HTTP schemas in `serve_app/protocol.py` reuse them, so the two doors cannot drift apart. The
deployment's configured limits (`LimitsConfig`) narrow them further in `check_limits`.
"""

import json
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Mapping, Optional, Protocol, get_args

import numpy as np
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from configs.app_args import LimitsConfig
from configs.model_spec import MAX_DEEP_CACHE_INTERVAL
from configs.schedulers import DISTILLED_SCHEDULE_STEPS, SCHEDULERS, canonical_scheduler

MAX_SEED = 2**32 - 1


def draw_seed() -> int:
    """A random seed for a request that gave none (it is returned with the image)."""
    return secrets.randbelow(MAX_SEED + 1)

Kind = Literal["txt2img", "img2img", "inpaint"]

#: `strength` when a request gives none: A1111's img2img default; inpaint repaints the mask fully.
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0}


def img2img_steps(steps: int, strength: float) -> int:
    """Scheduler steps an image-to-image pass of `steps` at `strength` runs: the tail diffusers'
    `get_timesteps` takes (`min(int(steps * strength), steps)`), but at least the last step:
    diffusers fails when the product is below 1 (steps 4 at strength 0.2), while the least change
    a request can mean is one step at the lowest noise level."""
    return max(1, min(int(steps * strength), steps))


def guided_steps(timesteps: int, guidance_end: float) -> int:
    """How many of a pass's `timesteps` (UNet evaluations, two per step for Heun) run guided:
    diffusers' dynamic-CFG callback drops the unconditional half *after* the step at index
    `int(timesteps × guidance_end)`, so that step is still guided; 1 reaches past the last step."""
    return min(timesteps, int(timesteps * guidance_end) + 1)


def check_one_step(field: str, steps: int, strength: float) -> None:
    """A 400 naming `<field>.strength` when a second stage (the refiner's post-pass, the hires
    pass) would run less than one step: its own settings say so, unlike a request's `strength`."""
    if int(steps * strength) < 1:
        raise InvalidRequestError(
            f"{field}.strength {strength!r} × {field}.steps {steps} is below one step; raise either",
            param=f"{field}.strength",
            code="invalid_value",
        )


def _utf8_text(value: Optional[str]) -> Optional[str]:
    # JSON may carry lone surrogates ("\ud800"); they cannot be encoded for the tokenizer, so
    # they are refused here rather than failing inside an engine.
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text") from None
    return value


#: What Python's `str.isspace` calls whitespace (none lies above U+3000), as a regex class: a
#: prompt needs a character outside it. Spelled out for the JSON schema because ECMA regexes and
#: Python disagree on `\\s` (U+0085 is whitespace to Python only).
_WHITESPACE = "".join(sorted({chr(c) for c in range(0x3100) if chr(c).isspace()}))
NOT_BLANK_PATTERN = "[^" + "".join(f"\\u{ord(c):04x}" for c in _WHITESPACE) + "]"


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


def _known_scheduler(value: Optional[str]) -> Optional[str]:
    return None if value is None else canonical_scheduler(value)


_SCHEDULER_NAMES = ", ".join(SCHEDULERS.values())

# --- the request fields, defined once for the HTTP schemas and this contract --------------------

Prompt = Annotated[
    str,
    Field(min_length=1, description="What to draw (not only whitespace).", json_schema_extra={"pattern": NOT_BLANK_PATTERN}),
    AfterValidator(_not_blank),
    AfterValidator(_utf8_text),
]
NegativePrompt = Annotated[
    Optional[str],
    Field(
        description=(
            "What to steer away from. Absent: the model's unconditional embedding (zeros for SDXL "
            "base), which differs from the empty string."
        )
    ),
    AfterValidator(_utf8_text),
]
Seed = Annotated[
    Optional[int],
    Field(ge=0, le=MAX_SEED, description="Noise seed; with n > 1, image i uses seed + i. Absent: random, and returned."),
]
Steps = Annotated[Optional[int], Field(ge=1, le=1000, description="Denoising steps. Absent: the model's default.")]
GuidanceScale = Annotated[
    Optional[float],
    Field(ge=0.0, le=50.0, description="Classifier-free guidance scale; <= 1 turns guidance off. Absent: the model's default."),
]
GuidanceEnd = Annotated[
    float,
    Field(
        gt=0.0,
        le=1.0,
        description=(
            "Fraction of the denoising steps after which classifier-free guidance stops: the first "
            "int(steps × guidance_end) + 1 steps are guided, the rest run the conditional prediction "
            "alone (half the UNet work; an approximation, diffusers' dynamic CFG). Needs guidance_scale > 1; "
            "1 (the default): every step is guided. Each pass of a hires request counts its own steps."
        ),
    ),
]
DeepCacheInterval = Annotated[
    Optional[int],
    Field(
        ge=1,
        le=MAX_DEEP_CACHE_INTERVAL,
        description=(
            "Reuse the UNet's deep features between steps (DeepCache; an approximation): the whole UNet "
            "runs on every deep_cache_interval-th step of a pass (the first included) and the steps between "
            "run only its full-resolution branch on the features kept from the last full step. "
            "1: every step runs the whole UNet. Absent: the deployment's model.default_deep_cache_interval "
            "(1 unless configured; /healthz states it), and 1 with controlnet or refiner. Above 1: "
            "not with controlnet or refiner; needs a deployment with model.optimize.deep_cache (400 "
            "deep_cache_disabled otherwise)."
        ),
    ),
]
Scheduler = Annotated[
    Optional[str],
    Field(description=f"Sampler: {_SCHEDULER_NAMES} (or their ids). Absent: the model's default."),
    AfterValidator(_known_scheduler),
]
#: diffusers' `timestep_spacing` values (every scheduler here takes all three; LCM and TCD refuse them).
TimestepSpacingName = Literal["leading", "trailing", "linspace"]


def _known_spacing(value: Any) -> Any:
    # Before the Literal's own check, so that the 400 quotes what was sent (pydantic's does not).
    if isinstance(value, str) and value not in get_args(TimestepSpacingName):
        known = ", ".join(repr(name) for name in get_args(TimestepSpacingName))
        raise ValueError(f"unknown timestep_spacing {value!r}; use one of {known}")
    return value


TimestepSpacing = Annotated[
    Optional[TimestepSpacingName],
    BeforeValidator(_known_spacing),
    Field(
        description=(
            "How the scheduler spaces its steps over the training timesteps (diffusers' timestep_spacing): "
            "trailing starts at the last one, as SDXL-Lightning, Hyper-SD and SDXL-Turbo were distilled to; "
            "leading and linspace as diffusers defines them. Not with LCM or TCD (their steps come from "
            "their distillation schedule: a 400). Absent: the model's scheduler config (leading for SDXL base)."
        )
    ),
]
Side = Annotated[
    Optional[int],
    Field(ge=8, le=16384, multiple_of=8, description="Pixels, a multiple of 8. Absent: the model's default."),
]
Strength = Annotated[
    Optional[float],
    Field(
        gt=0.0,
        le=1.0,
        description=(
            "How much to change the image, (0, 1]; 1 ignores it (under the mask). Runs "
            "int(num_inference_steps × strength) steps, at least one. Absent: 0.75 for img2img, "
            "1.0 for inpainting."
        ),
    ),
]
MaskBlur = Annotated[int, Field(ge=0, le=256, description="Gaussian blur of the mask edge, in pixels (0: off).")]
PaddingMaskCrop = Annotated[
    Optional[int],
    Field(
        ge=0,
        le=4096,
        description=(
            "Repaint only the mask's bounding box grown by this many pixels, at full resolution, "
            "and paste it back (A1111's 'inpaint only masked'); the rest stays pixel-exact."
        ),
    ),
]


#: A LoRA's name in the registry: no path separators, no `..`, nothing hidden or absolute.
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class LoraRef(BaseModel):
    """One LoRA of a request and its weight (a request's LoRAs are blended by these weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=LORA_NAME_PATTERN, description="A LoRA from `GET /v1/loras`.")
    weight: float = Field(
        1.0, ge=-4.0, le=4.0, description="How strongly it applies: 1 as trained, 0 not at all, negative reverses it."
    )


def json_form_part(expected: str) -> BeforeValidator:
    """A multipart form carries a structured field (a list, an object) as one JSON text part:
    parse it, or fail saying it `must be {expected}`."""

    def parse(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError(f"must be {expected}") from None
        return value

    return BeforeValidator(parse)


Loras = Annotated[
    tuple[LoraRef, ...],
    json_form_part("a JSON list of {name, weight} objects"),
    Field(
        description=(
            "LoRAs to apply, blended with their weights (as diffusers' `set_adapters`), e.g. "
            '[{"name": "pastel", "weight": 0.8}]; absent or empty: the base model, bit for bit. At '
            "most `limits.max_loras`; a name given twice applies twice (its weights add up). In "
            "multipart forms: the same list as a JSON text part."
        )
    ),
]


def live_loras(loras: tuple[LoraRef, ...]) -> list[tuple[str, float]]:
    """What identifies a request's set of LoRAs: (name, weight) pairs sorted, weight 0 dropped
    (it is the base model). The routing id and the engine's cache key are both made from it."""
    return sorted((lora.name, lora.weight) for lora in loras if lora.weight != 0)


def lora_set_id(loras: tuple[LoraRef, ...]) -> Optional[str]:
    """The routing id of a request's LoRAs (None for the base model): the same LoRAs and weights
    in any order give the same id, so requests for one set prefer the replica holding it."""
    live = live_loras(loras)
    return None if not live else "loras:" + ",".join(f"{name}={weight:g}" for name, weight in live)


#: Preprocessors the engines run on a control image before the ControlNet sees it.
Preprocessor = Literal["canny"]


def _rgb_array(value: Any, name: str) -> Any:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
        raise ValueError(f"{name} must be a uint8 numpy array of shape (H, W, 3)")
    return value


class CannyThresholds(BaseModel):
    """The double threshold of `preprocess: "canny"`, in units of colour contrast (0..1]. Given
    in either order, as OpenCV's Canny takes them: the smaller is the low one (`ordered()`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low_threshold: float = Field(0.08, gt=0.0, le=1.0, description="Canny: edges weaker than this are dropped.")
    high_threshold: float = Field(
        0.2, gt=0.0, le=1.0, description="Canny: edges stronger than this are kept; between the two, kept when linked to one."
    )

    def ordered(self) -> tuple[float, float]:
        """(low, high), whichever order they were given in."""
        return min(self.low_threshold, self.high_threshold), max(self.low_threshold, self.high_threshold)


#: "Thresholds only with `preprocess: canny`" in JSON Schema, so schema-valid bodies are the
#: ones the server accepts.
_THRESHOLDS_NEED_CANNY = {
    "if": {"not": {"properties": {"preprocess": {"const": "canny"}}, "required": ["preprocess"]}},
    "then": {"not": {"anyOf": [{"required": ["low_threshold"]}, {"required": ["high_threshold"]}]}},
}


class ControlSettings(CannyThresholds):
    """How one ControlNet steers a request, without its image: the fields the HTTP schema and
    this contract share."""

    model_config = ConfigDict(json_schema_extra=_THRESHOLDS_NEED_CANNY)

    name: str = Field(..., pattern=LORA_NAME_PATTERN, description="A ControlNet from `GET /v1/controlnets`.")
    conditioning_scale: float = Field(
        1.0, ge=0.0, le=4.0, description="How strongly the map steers (its residuals are multiplied by this)."
    )
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the steps after which it starts.")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the steps after which it stops.")
    preprocess: Optional[Preprocessor] = Field(
        None, description="Make the map from `image` in the service (`canny`); absent: `image` is the map."
    )

    @model_validator(mode="after")
    def _thresholds_need_canny(self) -> "ControlSettings":
        given = sorted({"low_threshold", "high_threshold"} & self.model_fields_set)
        if given and self.preprocess != "canny":
            raise ValueError(f"{', '.join(given)} apply to preprocess 'canny' only")
        return self

    @model_validator(mode="after")
    def _window(self) -> "ControlSettings":
        if self.guidance_start >= self.guidance_end:
            raise ValueError(
                f"guidance_start {self.guidance_start!r} must be below guidance_end {self.guidance_end!r}"
            )
        return self


class ControlRef(ControlSettings):
    """One ControlNet of a request, with its control image decoded."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    image: np.ndarray = Field(
        ..., description="The control map (or, with `preprocess`, the picture it is made from), uint8 RGB (H, W, 3)."
    )

    @field_validator("image")
    @classmethod
    def _rgb(cls, value: Any) -> np.ndarray:
        return _rgb_array(value, "image")


#: Most ControlNets one request may combine (they must be hosted by one deployment).
MAX_CONTROLNETS = 4


RefinerMode = Literal["ensemble", "post"]
#: `switch_at` and `strength` when a request gives none: SDXL's published ensemble split (80% of
#: the steps on the base, the last 20% on the refiner) and a light post-pass.
DEFAULT_SWITCH_AT = 0.8
DEFAULT_REFINER_STRENGTH = 0.3


#: "switch_at with ensemble only, strength with post only" in JSON Schema, so schema-valid
#: bodies are the ones the server accepts.
_REFINER_FIELDS_FIT_MODE = {
    "if": {"properties": {"mode": {"const": "post"}}, "required": ["mode"]},
    "then": {"not": {"required": ["switch_at"]}},
    "else": {"not": {"required": ["strength"]}},
}


class RefinerSettings(BaseModel):
    """How the refiner finishes a request: the fields the HTTP schema and this contract share."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_REFINER_FIELDS_FIT_MODE)

    mode: RefinerMode = Field(
        "ensemble",
        description=(
            "ensemble: the base denoises to `switch_at` and hands its latents to the refiner, which "
            "finishes the schedule (diffusers' denoising_end / denoising_start); post: the base "
            "finishes, then the refiner runs image-to-image on its latents at `strength`."
        ),
    )
    switch_at: Optional[float] = Field(
        None, gt=0.0, lt=1.0, description=f"ensemble: the fraction of the schedule where the refiner takes over. Absent: {DEFAULT_SWITCH_AT}."
    )
    strength: Optional[float] = Field(
        None,
        gt=0.0,
        le=1.0,
        description=f"post: how much of the base's image the refiner noises and denoises again. Absent: {DEFAULT_REFINER_STRENGTH}.",
    )
    steps: Steps = Field(
        None,
        description=(
            "The refiner's scheduler steps: the schedule it finishes (ensemble) or its img2img "
            "steps (post). Absent: the request's num_inference_steps."
        ),
    )
    aesthetic_score: float = Field(6.0, ge=0.0, le=10.0, description="The aesthetic score the refiner is conditioned on.")
    negative_aesthetic_score: float = Field(
        2.5, ge=0.0, le=10.0, description="The aesthetic score of the unconditional half of guidance (steers away from it)."
    )

    @model_validator(mode="after")
    def _fields_fit_mode(self) -> "RefinerSettings":
        if self.switch_at is not None and self.mode != "ensemble":
            raise ValueError("switch_at applies to mode 'ensemble' only")
        if self.strength is not None and self.mode != "post":
            raise ValueError("strength applies to mode 'post' only")
        return self

    def resolved(self, steps: int) -> "RefinerSettings":
        """These settings with their defaults filled in (`steps`: the request's)."""
        ensemble = self.mode == "ensemble"
        return self.model_copy(
            update={
                "switch_at": (self.switch_at or DEFAULT_SWITCH_AT) if ensemble else None,
                "strength": None if ensemble else (self.strength or DEFAULT_REFINER_STRENGTH),
                "steps": self.steps or steps,
            }
        )

    def refiner_steps(self) -> int:
        """Steps the refiner runs (resolved settings): the tail of its schedule after `switch_at`,
        or img2img's `int(steps × strength)`. Exact for first-order schedulers; progress totals
        are corrected by the engine's own counts as each stage runs."""
        if self.mode == "ensemble":
            return max(1, self.steps - round(self.steps * self.switch_at))
        return img2img_steps(self.steps, self.strength)


HiresUpscaler = Literal["latent", "lanczos"]
#: The hires pass's defaults: twice the first pass's size, 40% of the picture redrawn (enough to
#: add detail at the new size, little enough to keep the first pass's composition), PIL's Lanczos.
DEFAULT_HIRES_SCALE = 2.0
DEFAULT_HIRES_STRENGTH = 0.4
DEFAULT_HIRES_UPSCALER: HiresUpscaler = "lanczos"


#: "width with height, and not with scale" in JSON Schema, so schema-valid bodies are the ones the
#: server accepts.
_HIRES_SIZE_GIVEN_ONCE = {
    "dependentRequired": {"width": ["height"], "height": ["width"]},
    "not": {"required": ["scale", "width"]},
}


class HiresSettings(BaseModel):
    """A second, image-to-image pass at a larger size (a "hires fix"): the fields the HTTP schema
    and this contract share."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_HIRES_SIZE_GIVEN_ONCE)

    scale: Optional[float] = Field(
        None,
        gt=1.0,
        le=4.0,
        description=(
            f"The second pass's size as a multiple of the first's, each side rounded to a multiple of 8. "
            f"Absent (and no width/height): {DEFAULT_HIRES_SCALE}."
        ),
    )
    width: Side = Field(None, description="The second pass's width in pixels (with height; instead of scale).")
    height: Side = Field(None, description="The second pass's height in pixels (with width; instead of scale).")
    strength: Optional[float] = Field(
        None,
        gt=0.0,
        le=1.0,
        description=(
            "How much of the upscaled image is noised and drawn again; runs int(steps × strength) steps. "
            f"Absent: {DEFAULT_HIRES_STRENGTH} (the latent upscaler blurs: give it 0.5 or more)."
        ),
    )
    steps: Steps = Field(None, description="The second pass's scheduler steps (its img2img schedule). Absent: the request's num_inference_steps.")
    upscaler: Optional[HiresUpscaler] = Field(
        None,
        description=(
            "lanczos: the first pass is decoded, resized with PIL's Lanczos filter and encoded again; "
            f"latent: its latents are resized (bilinear), no VAE round trip. Absent: {DEFAULT_HIRES_UPSCALER}."
        ),
    )

    @model_validator(mode="after")
    def _one_way_to_size(self) -> "HiresSettings":
        if (self.width is None) != (self.height is None):
            raise ValueError("give hires.width and hires.height together")
        if self.scale is not None and self.width is not None:
            raise ValueError("give hires.scale or hires.width and hires.height, not both")
        return self

    def resolved(self, width: int, height: int, steps: int) -> "HiresSettings":
        """These settings with defaults filled in and the target size set, for a first pass of
        `width` x `height` and `steps` steps. Raises 400s naming the field."""
        if self.width is None:
            scale = self.scale or DEFAULT_HIRES_SCALE
            target = (max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8))
        else:
            target = (self.width, self.height)
        for name, side, first in (("width", target[0], width), ("height", target[1], height)):
            if side < first:
                raise InvalidRequestError(
                    f"hires.{name} {side} is below the first pass's {name} {first}; the hires pass enlarges",
                    param=f"hires.{name}",
                    code="invalid_size",
                )
        resolved = self.model_copy(  # the target size replaces the scale: stored jobs read it back
            update={
                "scale": None,
                "width": target[0],
                "height": target[1],
                "strength": self.strength or DEFAULT_HIRES_STRENGTH,
                "steps": self.steps or steps,
                "upscaler": self.upscaler or DEFAULT_HIRES_UPSCALER,
            }
        )
        check_one_step("hires", resolved.steps, resolved.strength)
        return resolved

    def pass_steps(self) -> int:
        """Steps the second pass runs (resolved settings): img2img's int(steps × strength)."""
        return img2img_steps(self.steps, self.strength)


@dataclass
class Handoff:
    """What the base stage of a refined request hands the refiner: its latents (as diffusers'
    `output_type="latent"` returns them: not scaled, not decoded) and the state of the request's
    `torch.Generator`, so the two stages draw from one generator as a diffusers base + refiner
    call pair given the same generator does. Travels through Ray, never as pixels."""

    request_id: str
    latents: np.ndarray  # float32 (4, height / 8, width / 8)
    generator_state: np.ndarray  # uint8: torch.Generator.get_state()
    #: Steps the base ran: where the refiner's progress starts.
    steps: int
    batch_size: int
    timings: dict[str, float] = field(default_factory=dict)


class _SpecDefaults(Protocol):
    """The part of a model spec (`configs.model_spec`) that supplies request defaults."""

    default_size: tuple[int, int]
    default_steps: int
    default_guidance_scale: float
    default_scheduler: str
    default_deep_cache_interval: int


class GenerationRequest(BaseModel):
    """One image to generate. Per-request fields batch freely; the rest form the compatibility key."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    prompt: Prompt
    negative_prompt: NegativePrompt = None
    width: Side = None
    height: Side = None
    num_inference_steps: Steps = None
    guidance_scale: GuidanceScale = None
    guidance_end: GuidanceEnd = 1.0
    deep_cache_interval: DeepCacheInterval = None
    scheduler: Scheduler = None
    timestep_spacing: TimestepSpacing = None
    seed: Seed = None
    kind: Kind = Field("txt2img", description="txt2img; img2img (needs init_image); inpaint (init_image and mask_image).")
    init_image: Optional[np.ndarray] = Field(
        None, description="img2img/inpaint: the starting picture, uint8 RGB (H, W, 3) at width x height."
    )
    mask_image: Optional[np.ndarray] = Field(
        None, description="inpaint: uint8 (H, W), same size as init_image; white (>= 128) is repainted."
    )
    strength: Strength = None
    mask_blur: MaskBlur = 0
    padding_mask_crop: PaddingMaskCrop = None
    loras: Loras = ()
    controlnets: tuple[ControlRef, ...] = Field(
        (),
        max_length=MAX_CONTROLNETS,
        description="ControlNets steering the image, each with its control image at width x height; their residuals add up.",
    )
    refiner: Optional[RefinerSettings] = Field(
        None, description="Finish the image on the refiner deployment (txt2img and img2img); absent: the base alone."
    )
    handoff: Optional[Handoff] = Field(
        None, description="Set by the router for the refiner stage only: the base stage's latents and generator."
    )
    hires: Optional[HiresSettings] = Field(
        None, description="txt2img: a second, image-to-image pass at a larger size on the same engine; absent: one pass."
    )
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    deadline: Optional[float] = Field(
        None,
        description="Unix time after which the engine abandons the request (504); `None` waits forever.",
    )

    @field_validator("init_image")
    @classmethod
    def _rgb_pixels(cls, value: Optional[np.ndarray]) -> Optional[np.ndarray]:
        return None if value is None else _rgb_array(value, "init_image")

    @field_validator("controlnets")
    @classmethod
    def _each_once(cls, value: tuple[ControlRef, ...]) -> tuple[ControlRef, ...]:
        names = [control.name for control in value]
        if len(set(names)) < len(names):
            raise ValueError(f"names a ControlNet more than once ({names}); give each once")
        return value

    @field_validator("hires")
    @classmethod
    def _hires_fits(cls, value: Optional[HiresSettings], info: ValidationInfo) -> Optional[HiresSettings]:
        # A field validator (kind and refiner are validated before it), so the error names `hires`.
        if value is not None and info.data.get("kind") != "txt2img":
            raise ValueError("hires applies to kind 'txt2img' only")
        if value is not None and info.data.get("refiner") is not None:
            raise ValueError("hires and refiner cannot be combined (yet): ask for one")
        return value

    @field_validator("mask_image")
    @classmethod
    def _mask_pixels(cls, value: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if value is not None and (not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 2):
            raise ValueError("mask_image must be a uint8 numpy array of shape (H, W)")
        return value

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> "GenerationRequest":
        needs = {"txt2img": (), "img2img": ("init_image",), "inpaint": ("init_image", "mask_image")}[self.kind]
        for name in ("init_image", "mask_image"):
            if name in needs and getattr(self, name) is None:
                raise ValueError(f"{name} is required for kind {self.kind!r}")
            if name not in needs and getattr(self, name) is not None:
                raise ValueError(f"{name} does not apply to kind {self.kind!r}")
        only_inpaint = {"mask_blur": self.mask_blur != 0, "padding_mask_crop": self.padding_mask_crop is not None}
        for name, given in only_inpaint.items():
            if given and self.kind != "inpaint":
                raise ValueError(f"{name} applies to kind 'inpaint' only")
        if self.strength is not None and self.kind == "txt2img":
            raise ValueError("strength applies to img2img and inpaint only")
        if self.refiner is not None and self.kind == "inpaint":
            raise ValueError("refiner applies to txt2img and img2img only")
        if self.handoff is not None and self.refiner is None:
            raise ValueError("handoff is the refiner stage's input: it needs refiner")
        if self.init_image is not None:
            height, width = self.init_image.shape[:2]
            if (self.width, self.height) not in ((None, None), (width, height)):
                raise ValueError(
                    f"init_image is {width}x{height} but width x height is {self.width}x{self.height}; "
                    "resize the image or leave the size out"
                )
            if self.mask_image is not None and self.mask_image.shape != (height, width):
                mask_h, mask_w = self.mask_image.shape
                raise ValueError(f"mask_image is {mask_w}x{mask_h} but init_image is {width}x{height}")
        for index, control in enumerate(self.controlnets):
            height, width = control.image.shape[:2]
            size = self._size_of_first_image()
            if size is not None and size != (width, height):
                raise ValueError(
                    f"controlnets.{index}.image is {width}x{height} but the image is {size[0]}x{size[1]}; "
                    "control images must have the size of the image"
                )
        return self

    def _size_of_first_image(self) -> Optional[tuple[int, int]]:
        """(width, height) fixed by the request: each side from its field, else from its init
        image, else from its first control image; None when nothing fixes it."""
        images = [image for image in (self.init_image, *(control.image for control in self.controlnets)) if image is not None]
        if not images and (self.width is None or self.height is None):
            return None
        first_height, first_width = images[0].shape[:2] if images else (None, None)
        return (self.width if self.width is not None else first_width, self.height if self.height is not None else first_height)

    def with_defaults(self, spec: "_SpecDefaults") -> "GenerationRequest":
        """This request with every `None` generation setting replaced by its default: the init
        image's size for img2img/inpaint, the model's defaults for the rest, a random seed. The
        one place defaults are resolved. `timestep_spacing` stays `None` when absent: its default
        is the model's scheduler config, which only the engine holds."""
        width, height = spec.default_size
        if self.init_image is not None or self.controlnets:
            width, height = self._size_of_first_image()
            if width % 8 or height % 8:
                param = "init_image" if self.init_image is not None else "controlnets"
                raise InvalidRequestError(
                    f"{param} is {width}x{height}; both sides must be multiples of 8", param=param, code="invalid_size"
                )
        steps = self.num_inference_steps or spec.default_steps
        refiner = None if self.refiner is None else self.refiner.resolved(steps)
        if refiner is not None and refiner.mode == "post":
            check_one_step("refiner", refiner.steps, refiner.strength)
        width = self.width if self.width is not None else width
        height = self.height if self.height is not None else height
        guidance_scale = self.guidance_scale if self.guidance_scale is not None else spec.default_guidance_scale
        self._check_guidance_end(guidance_scale)
        deep_cache_interval = self._deep_cache_interval(spec.default_deep_cache_interval)
        resolved = self.model_copy(
            update={
                "refiner": refiner,
                "hires": None if self.hires is None else self.hires.resolved(width, height, steps),
                "width": width,
                "height": height,
                "strength": self.strength if self.strength is not None else DEFAULT_STRENGTH.get(self.kind),
                "num_inference_steps": steps,
                "guidance_scale": guidance_scale,
                "deep_cache_interval": deep_cache_interval,
                "scheduler": self.scheduler or spec.default_scheduler,
                "seed": self.seed if self.seed is not None else draw_seed(),
            }
        )
        resolved._check_distilled_schedule()
        return resolved

    def steps_by_field(self) -> dict[str, int]:
        """The scheduler steps of each pass this (resolved) request runs, by the field that
        sets them: what the step limits check and name in their 400s."""
        steps = {"num_inference_steps": self.num_inference_steps}
        if self.refiner is not None:
            steps["refiner.steps"] = self.refiner.steps
        if self.hires is not None:
            steps["hires.steps"] = self.hires.steps
        return steps

    def _check_distilled_schedule(self) -> None:
        """A 400 naming the steps field of a pass that asks LCM or TCD (the resolved scheduler:
        perhaps the model's default) for more steps than their distillation schedule holds, which
        diffusers would refuse while the engine prepares the row. The refiner and a hires pass
        run the request's scheduler too."""
        limit = DISTILLED_SCHEDULE_STEPS.get(self.scheduler)
        if limit is None:
            return
        if self.timestep_spacing is not None:
            # Their steps come from the distillation schedule; a spacing would be accepted and ignored.
            raise InvalidRequestError(
                f"timestep_spacing {self.timestep_spacing!r} does not apply to scheduler {self.scheduler!r} (its steps "
                "come from its distillation schedule); leave it out",
                param="timestep_spacing",
            )
        for name, count in self.steps_by_field().items():
            if count > limit:
                raise InvalidRequestError(
                    f"{name} {count} is above the {limit} steps scheduler {self.scheduler!r} can run "
                    "(its distillation schedule); ask for fewer",
                    param=name,
                    code="invalid_steps",
                )

    def _check_guidance_end(self, guidance_scale: float) -> None:
        """A 400 naming `guidance_end` where ending guidance early cannot mean what it says,
        rather than ignoring it: without guidance (`guidance_scale`, resolved: perhaps the model's
        default, <= 1), and with the refiner, whose ensemble continues the base's schedule on
        another engine, so cutting each stage's guidance would turn it back on at the switch."""
        if self.guidance_end == 1.0:
            return
        if guidance_scale <= 1.0:
            raise InvalidRequestError(
                f"guidance_end {self.guidance_end!r} needs classifier-free guidance, but guidance_scale is "
                f"{guidance_scale!r} (<= 1: no guidance to end)",
                param="guidance_end",
                code="unsupported_value",
            )
        if self.refiner is not None:
            raise InvalidRequestError(
                f"guidance_end {self.guidance_end!r} cannot be combined with refiner (yet): give 1 or leave it out",
                param="guidance_end",
                code="unsupported_value",
            )

    def _deep_cache_interval(self, default: int) -> int:
        """The interval this request runs at: its own, else the deployment's `default` where deep
        caching can serve it and 1 where it cannot. What it cannot serve, its shallow steps would
        silently drop: a ControlNet's residuals enter the deep blocks those steps skip, and the
        refiner's ensemble continues the base's schedule on another engine (whose steps would
        restart the interval). Asking for an interval above 1 with either is a 400 naming
        `deep_cache_interval`."""
        unservable = [name for name, given in (("controlnet", bool(self.controlnets)), ("refiner", self.refiner is not None)) if given]
        if self.deep_cache_interval is None:
            return 1 if unservable else default
        if self.deep_cache_interval > 1 and unservable:
            raise InvalidRequestError(
                f"deep_cache_interval {self.deep_cache_interval} cannot be combined with {unservable[0]} (yet): "
                "give 1 or leave it out",
                param="deep_cache_interval",
                code="unsupported_value",
            )
        return self.deep_cache_interval

    def output_size(self) -> tuple[int, int]:
        """(width, height) of the image this (resolved) request answers: the hires pass's when it
        has one."""
        size = self.hires or self
        return size.width, size.height

    def denoising_steps(self) -> int:
        """Scheduler steps this (resolved) request runs: img2img and inpaint skip the first
        `1 - strength` of the schedule (`img2img_steps`). Progress totals count these steps."""
        steps = self.num_inference_steps or 1
        if self.kind == "txt2img" or self.strength is None:
            return steps
        return img2img_steps(steps, self.strength)

    def progress_steps(self) -> int:
        """Steps of both stages or passes (resolved request): what progress totals count. Before the switch
        the base runs `switch_at` of its schedule (rounded as diffusers' cut-off rounds it for
        first-order schedulers); the engines' own counts replace the estimate as stages run."""
        steps = self.denoising_steps()
        if self.hires is not None:
            return steps + self.hires.pass_steps()
        if self.refiner is None:
            return steps
        if self.refiner.mode == "ensemble":
            steps = max(1, round(steps * self.refiner.switch_at))
        return steps + self.refiner.refiner_steps()


@dataclass
class GenerationResult:
    """One finished image, as uint8 pixels (H, W, 3); encoding happens in the ingress."""

    request_id: str
    image: np.ndarray
    seed: int
    #: The most requests that shared one UNet forward with this one.
    batch_size: int
    #: Seconds: `queue_s` from reaching the engine to joining its running batch, `run_s` from
    #: joining to the finished image (its steps and its decode).
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ProgressEvent:
    """A denoising step finished (streamed by `generate_stream` before the result)."""

    step: int
    total: int


class ServiceError(Exception):
    """Base of the errors that cross Ray handles and map to one HTTP status each.

    Instances pickle with their message, parameter and code, so a caller on another process gets
    the same type back (Ray wraps it; `unwrap_error` below recovers it).
    """

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):
        return (type(self), (self.message, self.param, self.code))


class InvalidRequestError(ServiceError):
    status_code = 400
    error_type = "invalid_request_error"


class UnauthorizedError(ServiceError):
    """No API key, or one this server does not know (answered with `WWW-Authenticate: Bearer`)."""

    status_code = 401
    error_type = "authentication_error"


class ForbiddenError(ServiceError):
    """A known API key without the scope this endpoint needs."""

    status_code = 403
    error_type = "permission_error"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    error_type = "invalid_request_error"


class UnsupportedMediaTypeError(ServiceError):
    status_code = 415
    error_type = "invalid_request_error"


class NotFoundError(ServiceError):
    status_code = 404
    error_type = "not_found_error"


class ConflictError(ServiceError):
    """The resource is not in a state that allows this (a job not finished, or already finished)."""

    status_code = 409
    error_type = "conflict_error"


class GoneError(ServiceError):
    status_code = 410
    error_type = "not_found_error"


class TooManyRequestsError(ServiceError):
    status_code = 429
    error_type = "rate_limit_error"


class ModelNotFoundError(ServiceError):
    status_code = 404
    error_type = "invalid_request_error"


class RequestCancelledError(ServiceError):
    status_code = 409
    error_type = "cancelled"


class DeadlineExceededError(ServiceError):
    status_code = 504
    error_type = "timeout_error"


class OverloadedError(ServiceError):
    status_code = 503
    error_type = "overloaded_error"


class EngineError(ServiceError):
    """The engine failed on a valid request; the message is safe to show, details go to the logs."""

    status_code = 500
    error_type = "server_error"


#: The engine role (deployment) that serves requests without ControlNets; each ControlNet variant
#: is a role of its own (`configs.app_args.controlnet_role`).
BASE_ROLE = "base"
#: The refiner's role: the second stage of requests that ask for it.
REFINER_ROLE = "refiner"


def check_known_controlnets(controls: tuple[ControlRef, ...], known: Any, refusal: str, code: str) -> None:
    """A 400 naming the first ControlNet of `controls` not in `known`: "controlnets.i.name 'x' is
    {refusal}: <the known names>)". The router and each engine check with it."""
    for index, control in enumerate(controls):
        if control.name not in known:
            served = ", ".join(sorted(known)) or "none"
            raise InvalidRequestError(
                f"controlnets.{index}.name {control.name!r} is {refusal}: {served})",
                param=f"controlnets.{index}.name",
                code=code,
            )


def engine_role(request: GenerationRequest, controlnet_roles: Mapping[str, str]) -> str:
    """Which engine deployment of the graph serves this request: the base, or the ControlNet
    deployment hosting all of its ControlNets (`controlnet_roles`: name → role). A name no
    deployment hosts, or names hosted apart, are 400s naming the field."""
    check_known_controlnets(request.controlnets, controlnet_roles, "not a served ControlNet (served", "controlnet_not_found")
    roles = [controlnet_roles[control.name] for control in request.controlnets]
    if not roles:
        return BASE_ROLE
    if len(set(roles)) > 1:
        raise InvalidRequestError(
            f"controlnets {[control.name for control in request.controlnets]} are hosted by different deployments "
            f"({sorted(set(roles))}); a request may combine only ControlNets hosted together",
            param="controlnets",
            code="controlnets_not_hosted_together",
        )
    return roles[0]


def engine_handle(
    engines: Any, request: GenerationRequest, controlnet_roles: Mapping[str, str], lora_routing: str = "multiplexed"
) -> Any:
    """The handle a request goes through, from a `{role: handle}` registry: its role's engine,
    asking for a replica that holds its LoRA set when it has one (unless `lora_routing`, the
    `loras.routing` setting, is `any`). The one routing rule the ingress and the job manager share."""
    handle = engines[engine_role(request, controlnet_roles)]
    set_id = lora_set_id(request.loras) if lora_routing == "multiplexed" else None
    return handle if set_id is None else handle.options(multiplexed_model_id=set_id)


def refiner_handle(engines: Mapping[str, Any], request: GenerationRequest) -> Optional[Any]:
    """The refiner's handle for a request that asks for the refiner (None when it does not); a
    400 naming `refiner` when the graph has none."""
    if request.refiner is None:
        return None
    if REFINER_ROLE not in engines:
        raise InvalidRequestError("refiner: this deployment serves no refiner", param="refiner", code="refiner_not_served")
    return engines[REFINER_ROLE]


def unwrap_error(exc: BaseException) -> BaseException:
    """Return the `ServiceError` behind a Ray wrapper (RayTaskError keeps it in `.cause`)."""
    seen = 0
    while not isinstance(exc, ServiceError) and getattr(exc, "cause", None) is not None and seen < 8:
        exc = exc.cause
        seen += 1
    return exc


def check_limits(request: GenerationRequest, limits: LimitsConfig) -> None:
    """Reject a (defaults-resolved) request beyond the deployment's limits, naming the field.

    Both doors use it: the ingress before it calls an engine, and the engine for handle callers.
    """
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise InvalidRequestError(
                f"{name} is {len(text)} characters long; the limit is {limits.max_prompt_chars}",
                param=name,
                code="string_above_max_length",
            )
    for name in ("width", "height"):
        side = getattr(request, name)
        if side < limits.min_side:
            raise InvalidRequestError(
                f"{name} {side} is below the minimum of {limits.min_side}", param=name, code="invalid_size"
            )
    sizes = {"width": (request.width, request.height)}
    if request.hires is not None:
        sizes["hires.width"] = (request.hires.width, request.hires.height)
    for param, (width, height) in sizes.items():
        if width * height > limits.max_pixels:
            raise InvalidRequestError(
                f"size {width}x{height} is {width * height} pixels; the limit is {limits.max_pixels}",
                param=param,
                code="invalid_size",
            )
    if len(request.loras) > limits.max_loras:
        raise InvalidRequestError(
            f"{len(request.loras)} LoRAs were asked for; the limit is {limits.max_loras}", param="loras", code="too_many_loras"
        )
    for name, count in request.steps_by_field().items():
        if count > limits.max_steps:
            raise InvalidRequestError(
                f"{name} {count} is above the limit of {limits.max_steps}", param=name, code="invalid_steps"
            )
