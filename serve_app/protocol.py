"""HTTP request and response schemas (pydantic). No logic beyond field-level validation.

`ImageGenerationRequest` follows the OpenAI Images API (`POST /v1/images/generations`) and adds the
SDXL controls as extra fields; `Txt2ImgRequest` is the native endpoint that answers image bytes.
Unknown fields are rejected, as OpenAI does, so a misspelt option never goes silently unused.
"""

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from configs.schedulers import canonical_scheduler
from deployments.types import MAX_SEED

OutputFormat = Literal["png", "jpeg", "webp"]

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SDXLControls(_Strict):
    """The generation controls both endpoints share; `None` means the model's default."""

    prompt: str = Field(..., min_length=1, description="What to draw.")
    negative_prompt: Optional[str] = Field(None, description="What to steer away from.")
    model: Optional[str] = Field(None, description="Model id from `GET /v1/models`; default: the served model.")
    seed: Optional[int] = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Noise seed. With n > 1, image i uses seed + i. Absent: random, and returned.",
    )
    num_inference_steps: Optional[int] = Field(None, ge=1, description="Denoising steps.")
    guidance_scale: Optional[float] = Field(None, ge=0.0, le=50.0, description="Classifier-free guidance scale.")
    scheduler: Optional[str] = Field(
        None, description="Sampler: Euler, Euler a, Heun, DDIM, DPM++ 2M, DPM++ 2M Karras, DPM++ 2M SDE Karras, UniPC."
    )
    output_format: OutputFormat = Field("png", description="Encoding of the returned image(s).")
    output_compression: Optional[int] = Field(
        None,
        ge=0,
        le=100,
        description="jpeg/webp quality 0-100 (100 = best, the default); not allowed with png.",
    )

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else canonical_scheduler(value)


class ImageGenerationRequest(SDXLControls):
    """OpenAI-compatible `POST /v1/images/generations` body."""

    n: int = Field(1, ge=1, description="Number of images (1 to the configured `max_n`, 10 by default).")
    size: Optional[str] = Field(
        None, description='"WIDTHxHEIGHT" (multiples of 8), or "auto"/absent for the model default.'
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description='"b64_json" (stored "url" results come with async jobs).'
    )
    user: Optional[str] = Field(None, max_length=256, description="End-user id, written to the request log.")

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value != "auto" and not _SIZE.match(value):
            raise ValueError(f'size {value!r} must look like "1024x1024" (WIDTHxHEIGHT) or be "auto"')
        return value

    def parsed_size(self) -> tuple[Optional[int], Optional[int]]:
        if self.size is None or self.size == "auto":
            return None, None
        width, height = _SIZE.match(self.size).groups()
        return int(width), int(height)


class Txt2ImgRequest(SDXLControls):
    """Native `POST /v1/txt2img` body; the response is the image bytes."""

    width: Optional[int] = Field(None, ge=1, description="Image width in pixels (multiple of 8).")
    height: Optional[int] = Field(None, ge=1, description="Image height in pixels (multiple of 8).")


class ImageData(BaseModel):
    b64_json: Optional[str] = None
    url: Optional[str] = None
    revised_prompt: Optional[str] = None
    seed: int = Field(..., description="The seed that made this image (SDXL extra).")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    model: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sdxl-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody
