"""The contract between the ingress and the engines: requests, results and typed errors.

One `GenerationRequest` is one image. It is what the HTTP ingress sends through a
`DeploymentHandle`, what other Ray apps send directly, and (later) what a job stores. Nothing heavy
lives here: pydantic, dataclasses and numpy only, so both sides import it cheaply.
"""

import uuid
from dataclasses import dataclass, field
from typing import Literal, Optional, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from configs.app_args import LimitsConfig
from configs.schedulers import canonical_scheduler

MAX_SEED = 2**32 - 1


class _SpecDefaults(Protocol):
    """The part of a model spec (`configs.model_spec`) that supplies request defaults."""

    default_size: tuple[int, int]
    default_steps: int
    default_guidance_scale: float
    default_scheduler: str


class GenerationRequest(BaseModel):
    """One image to generate. Per-request fields batch freely; the rest form the compatibility key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(..., min_length=1, description="What to draw.")
    negative_prompt: Optional[str] = Field(
        None,
        description=(
            "What to steer away from. `None` uses the model's unconditional embedding (zeros for "
            "SDXL base), which differs from the empty string."
        ),
    )
    width: Optional[int] = Field(
        None, ge=8, le=16384, multiple_of=8, description="Image width in pixels; `None`: the model's default."
    )
    height: Optional[int] = Field(
        None, ge=8, le=16384, multiple_of=8, description="Image height in pixels; `None`: the model's default."
    )
    num_inference_steps: Optional[int] = Field(
        None, ge=1, le=1000, description="Denoising steps; `None`: the model's default."
    )
    guidance_scale: Optional[float] = Field(
        None, ge=0.0, le=50.0, description="Classifier-free guidance scale; `None`: the model's default."
    )
    scheduler: Optional[str] = Field(
        None, description="Scheduler id or name (see `configs.schedulers`); `None`: the model's default."
    )
    seed: Optional[int] = Field(
        None, ge=0, le=MAX_SEED, description="Noise seed; drawn by the engine when absent, and returned."
    )
    kind: Literal["txt2img"] = Field("txt2img", description="Generation kind.")
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    deadline: Optional[float] = Field(
        None,
        description="Unix time after which the engine abandons the request (504); `None` waits forever.",
    )

    @field_validator("scheduler")
    @classmethod
    def _canonical_scheduler(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else canonical_scheduler(value)

    def with_defaults(self, spec: "_SpecDefaults") -> "GenerationRequest":
        """This request with every `None` generation setting replaced by the model's default."""
        width, height = spec.default_size
        return self.model_copy(
            update={
                "width": self.width if self.width is not None else width,
                "height": self.height if self.height is not None else height,
                "num_inference_steps": self.num_inference_steps or spec.default_steps,
                "guidance_scale": (
                    self.guidance_scale if self.guidance_scale is not None else spec.default_guidance_scale
                ),
                "scheduler": self.scheduler or spec.default_scheduler,
            }
        )


@dataclass
class GenerationResult:
    """One finished image, as uint8 pixels (H, W, 3); encoding happens in the ingress."""

    request_id: str
    image: np.ndarray
    seed: int
    #: How many requests shared this image's forward passes.
    batch_size: int
    #: Seconds: `queue_s` waiting for a batch slot, `run_s` inside the pipeline call.
    timings: dict[str, float] = field(default_factory=dict)


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
    if not request.prompt.strip():
        raise InvalidRequestError("prompt must not be empty or only whitespace", param="prompt", code="empty_prompt")
    for name in ("width", "height"):
        side = getattr(request, name)
        if side < limits.min_side:
            raise InvalidRequestError(
                f"{name} {side} is below the minimum of {limits.min_side}", param=name, code="invalid_size"
            )
    if request.width * request.height > limits.max_pixels:
        raise InvalidRequestError(
            f"size {request.width}x{request.height} is {request.width * request.height} pixels; "
            f"the limit is {limits.max_pixels}",
            param="width",
            code="invalid_size",
        )
    if request.num_inference_steps > limits.max_steps:
        raise InvalidRequestError(
            f"num_inference_steps {request.num_inference_steps} is above the limit of {limits.max_steps}",
            param="num_inference_steps",
            code="invalid_steps",
        )
