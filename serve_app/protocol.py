"""HTTP request and response schemas (pydantic). No logic beyond field-level validation.

`ImageGenerationRequest` follows the OpenAI Images API (`POST /v1/images/generations`) and adds the
SDXL controls as extra fields; `Txt2ImgRequest` is the native endpoint that answers image bytes.
Unknown fields are rejected, as OpenAI does, so a misspelt option never goes silently unused.
"""

import base64
import binascii
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, HttpUrl, WithJsonSchema, field_validator

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


def _image_bytes(value: Any) -> bytes:
    """Multipart uploads arrive as bytes; JSON carries base64 (plain or as a data: URL)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64 image data") from None
    raise ValueError("must be an image: base64 text in JSON, a file in multipart/form-data")


ImageUpload = Annotated[
    bytes,
    BeforeValidator(_image_bytes),
    WithJsonSchema({"type": "string", "format": "binary", "description": "PNG, JPEG or WEBP (base64 in JSON)."}),
]


class _OpenAIImageOptions(BaseModel):
    """Fields the OpenAI generations and edits calls share."""

    n: int = Field(1, ge=1, description="Number of images (1 to the configured `max_n`, 10 by default).")
    size: Optional[str] = Field(
        None, description='"WIDTHxHEIGHT" (multiples of 8), or "auto"/absent for the default.'
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


class _Img2ImgOptions(BaseModel):
    strength: Optional[float] = Field(
        None,
        gt=0.0,
        le=1.0,
        description="How much to change the image, (0, 1]; default 0.75 for img2img, 1.0 for inpainting.",
    )


class _InpaintOptions(_Img2ImgOptions):
    mask_blur: int = Field(0, ge=0, le=256, description="Blur of the mask edge in pixels (0: off).")
    padding_mask_crop: Optional[int] = Field(
        None,
        ge=0,
        le=4096,
        description=(
            "Repaint only the mask's bounding box grown by this many pixels, at full resolution, and "
            "paste it back (A1111's 'inpaint only masked'). Absent: the whole image is processed."
        ),
    )


class ImageGenerationRequest(SDXLControls, _OpenAIImageOptions):
    """OpenAI-compatible `POST /v1/images/generations` body."""


class ImageEditRequest(SDXLControls, _OpenAIImageOptions, _InpaintOptions):
    """OpenAI-compatible `POST /v1/images/edits` form: `image`, optional `mask` (PNG whose fully
    transparent pixels mark the area to edit). Without a mask, an image with transparency is
    inpainted there; an opaque one is transformed as a whole (img2img)."""

    image: ImageUpload = Field(..., description="The image to edit.")
    mask: Optional[ImageUpload] = Field(
        None, description="PNG with an alpha channel, same size as image; fully transparent = edit."
    )


class _NativeOptions(BaseModel):
    width: Optional[int] = Field(None, ge=1, description="Image width in pixels (multiple of 8).")
    height: Optional[int] = Field(None, ge=1, description="Image height in pixels (multiple of 8).")
    response_format: Literal["image", "b64_json"] = Field(
        "image", description='"image": the encoded image bytes; "b64_json": the JSON form of the images API.'
    )


class Txt2ImgRequest(SDXLControls, _NativeOptions):
    """Native `POST /v1/txt2img` body."""


class Img2ImgRequest(SDXLControls, _NativeOptions, _Img2ImgOptions):
    """Native `POST /v1/img2img` body (JSON with base64 `image`, or multipart/form-data)."""

    image: ImageUpload = Field(..., description="The starting image.")


class InpaintRequest(SDXLControls, _NativeOptions, _InpaintOptions):
    """Native `POST /v1/inpaint` body (JSON with base64 `image`/`mask`, or multipart/form-data)."""

    image: ImageUpload = Field(..., description="The image to repaint.")
    mask: ImageUpload = Field(..., description="Same size as image; white = repaint, black = keep.")


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


JobKind = Literal["txt2img", "img2img", "inpaint"]


class JobSubmission(_Strict):
    """`POST /v1/jobs`: any generation request, run in the background."""

    kind: JobKind = Field(..., description="Which native endpoint's request `params` is.")
    params: dict[str, Any] = Field(
        ..., description="The body of `/v1/txt2img`, `/v1/img2img` or `/v1/inpaint` (images as base64)."
    )
    n: int = Field(1, ge=1, description="Images to make (seed, seed + 1, ...); more than one gives a ZIP.")
    webhook_url: Optional[HttpUrl] = Field(None, description="http(s) URL that gets a POST of the final job state.")


class BatchItem(_Strict):
    kind: JobKind = Field("txt2img", description="Which native endpoint's request `params` is.")
    params: dict[str, Any] = Field(..., description="That endpoint's body (images as base64).")


class BatchRequest(_Strict):
    """`POST /v1/images/batch`: many requests, one ZIP (images + manifest.json)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompts: Optional[list[str]] = Field(None, min_length=1, description="Text-to-image prompts sharing `params`.")
    params: Optional[dict[str, Any]] = Field(
        None, description="With `prompts`: the shared `/v1/txt2img` settings (everything but `prompt`)."
    )
    requests: Optional[list[BatchItem]] = Field(None, min_length=1, description="Full requests, each with its kind.")
    run_async: bool = Field(False, alias="async", description="Answer 202 with a job whose result is the ZIP.")
    webhook_url: Optional[HttpUrl] = Field(None, description="With async: POSTed the final job state.")
    output_format: OutputFormat = Field("png", description="Encoding of every image in the ZIP.")
    output_compression: Optional[int] = Field(None, ge=0, le=100, description="jpeg/webp quality 0-100.")
