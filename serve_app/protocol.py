"""HTTP request and response schemas (pydantic). No logic beyond field-level validation.

The generation fields come from the contract (`deployments.types`: one definition of each field's
bounds and docs); this module composes them into the bodies of each endpoint. `ImageGenerationRequest`
follows the OpenAI Images API and adds the SDXL controls as extra fields; the native endpoints answer
image bytes. Unknown fields are rejected, as OpenAI does, so a misspelt option never goes silently
unused. Limits that depend on the deployment's configuration (steps, sizes, n, prompt length) are
checked at run time and written into the served OpenAPI schema by `serve_app.openapi`.
"""

import base64
import binascii
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    HttpUrl,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from deployments.types import (
    MAX_CONTROLNETS,
    CannyThresholds,
    ControlSettings,
    DeepCacheInterval,
    GuidanceEnd,
    GuidanceScale,
    Loras,
    MaskBlur,
    NegativePrompt,
    PaddingMaskCrop,
    HiresSettings,
    RefinerSettings,
    Preprocessor,
    Prompt,
    Scheduler,
    Seed,
    Side,
    Steps,
    Strength,
    TimestepSpacing,
    json_form_part,
)
from deployments.training import MAX_CAPTION_CHARS, LoraTrainingSettings

OutputFormat = Literal["png", "jpeg", "webp"]
JobKind = Literal["txt2img", "img2img", "inpaint"]

#: `size`: "WIDTHxHEIGHT" (the side rules are the width/height rules) or "auto".
SIZE_PATTERN = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- the parts bodies are made of -----------------------------------------------------------------


class _Prompted(_Strict):
    prompt: Prompt


#: The JSON Schema form of "output_compression only with jpeg or webp" (png, also by default, is
#: lossless and takes no quality), so schema-valid bodies are the ones the server accepts.
_COMPRESSION_NEEDS_LOSSY = {
    "if": {"properties": {"output_format": {"const": "png"}}},
    "then": {"properties": {"output_compression": {"type": "null"}}},
}


class _Encoded(_Strict):
    model_config = ConfigDict(json_schema_extra=_COMPRESSION_NEEDS_LOSSY)

    output_format: OutputFormat = Field("png", description="Encoding of the returned image(s).")
    output_compression: Optional[int] = Field(
        None, ge=0, le=100, description="jpeg/webp quality 0-100 (100 = best, the default); not allowed with png."
    )

    @field_validator("output_compression")
    @classmethod
    def _compression_needs_a_lossy_format(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value is not None and info.data.get("output_format", "png") == "png":
            raise ValueError("applies to jpeg and webp only, not png")
        return value


class _Sized(_Strict):
    width: Side = None
    height: Side = None


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


#: In JSON an image is base64 text (`format: byte`); `serve_app.openapi` states the multipart
#: form of the same body with `format: binary` (a file part).
ImageUpload = Annotated[
    bytes,
    BeforeValidator(_image_bytes),
    WithJsonSchema(
        {"type": "string", "format": "byte", "description": "PNG, JPEG or WEBP; base64 (or a data: URL) in JSON."}
    ),
]


class ControlNetInput(ControlSettings):
    """One ControlNet of an HTTP request: the contract's settings and the control image, uploaded."""

    image: ImageUpload = Field(
        ...,
        description=(
            "The control map (or, with `preprocess`, the picture it is made from): PNG, JPEG or WEBP, base64 "
            "(or a data: URL), also inside a multipart form's JSON text part. Resized to the output size as "
            "the init image is."
        ),
    )


def _one_or_many(value: Any) -> str:
    return "many" if isinstance(value, list) else "one"


ControlNetField = Annotated[
    Optional[
        Annotated[
            Union[
                Annotated[ControlNetInput, Tag("one")],
                Annotated[list[ControlNetInput], Field(min_length=1, max_length=MAX_CONTROLNETS), Tag("many")],
            ],
            Discriminator(_one_or_many),
        ]
    ],
    json_form_part("a JSON object or a JSON list of objects"),
    Field(
        description=(
            "ControlNet conditioning: one `{name, image, conditioning_scale, guidance_start, guidance_end, "
            f"preprocess}}` or a list of up to {MAX_CONTROLNETS} hosted by one deployment (`GET /v1/controlnets`); "
            "their residuals add up. In multipart forms: the same JSON as a text part."
        ),
    ),
]


def controlnet_list(value: Optional[Union[ControlNetInput, list[ControlNetInput]]]) -> list[ControlNetInput]:
    """The `controlnet` field as a list (one object is a list of one)."""
    if value is None:
        return []
    return [value] if isinstance(value, ControlNetInput) else list(value)


class _Settings(_Strict):
    """The generation controls every kind shares; absent means the model's default."""

    negative_prompt: NegativePrompt = None
    model: Optional[str] = Field(None, description="Model id from `GET /v1/models`; absent: the served model.")
    seed: Seed = None
    num_inference_steps: Steps = None
    guidance_scale: GuidanceScale = None
    guidance_end: GuidanceEnd = 1.0
    deep_cache_interval: DeepCacheInterval = None
    scheduler: Scheduler = None
    timestep_spacing: TimestepSpacing = None
    loras: Loras = ()
    controlnet: ControlNetField = None


class _Refined(_Strict):
    """The refiner stage, for the kinds it applies to (txt2img and img2img)."""

    refiner: Annotated[Optional[RefinerSettings], json_form_part("a JSON object")] = Field(
        None,
        description=(
            "Finish the image on the refiner deployment: `{mode: \"ensemble\" | \"post\", switch_at, strength, "
            "steps, aesthetic_score, negative_aesthetic_score}`; 400 `refiner_not_served` when the deployment has none. "
            "In multipart forms: the same JSON as a text part."
        ),
    )


class _Hires(_Strict):
    """The hires pass, for text-to-image."""

    hires: Annotated[Optional[HiresSettings], json_form_part("a JSON object")] = Field(
        None,
        description=(
            "A second, image-to-image pass at a larger size (a \"hires fix\"): `{scale | width + height, "
            "strength, steps, upscaler: \"lanczos\" | \"latent\"}`; the first pass runs at width x height. "
            "In multipart forms: the same JSON as a text part."
        ),
    )


class _Img2Img(_Strict):
    image: ImageUpload = Field(..., description="The starting image.")
    strength: Strength = None


class _InpaintOptions(_Strict):
    strength: Strength = None
    mask_blur: MaskBlur = 0
    padding_mask_crop: PaddingMaskCrop = None


class _Inpaint(_InpaintOptions):
    image: ImageUpload = Field(..., description="The image to repaint.")
    mask: ImageUpload = Field(..., description="Same size as image; white = repaint, black = keep.")


class _NativeResponse(_Strict):
    response_format: Literal["image", "b64_json"] = Field(
        "image", description='"image": the encoded image bytes; "b64_json": the JSON form of the images API.'
    )


# --- native endpoints (`/v1/txt2img`, `/v1/img2img`, `/v1/inpaint`) --------------------------------
# Field order in the schema follows the bases from last to first: the prompt comes first.


class Txt2ImgRequest(_NativeResponse, _Encoded, _Sized, _Hires, _Refined, _Settings, _Prompted):
    """Native `POST /v1/txt2img` body."""


class Img2ImgRequest(_NativeResponse, _Encoded, _Sized, _Img2Img, _Refined, _Settings, _Prompted):
    """Native `POST /v1/img2img` body (JSON with base64 `image`, or multipart/form-data). Without
    width and height the image's own size is used (scaled to fit the limits, rounded down to 8)."""


class InpaintRequest(_NativeResponse, _Encoded, _Sized, _Inpaint, _Settings, _Prompted):
    """Native `POST /v1/inpaint` body (JSON with base64 `image`/`mask`, or multipart/form-data)."""


# --- the OpenAI Images API ---------------------------------------------------------------------


class _OpenAIImageOptions(_Strict):
    """Fields the OpenAI generations and edits calls share."""

    n: int = Field(1, ge=1, description="Number of images (1 to the configured `limits.max_n`); image i uses seed + i.")
    size: Optional[str] = Field(
        None,
        pattern=SIZE_PATTERN,
        description='"WIDTHxHEIGHT" (each side a multiple of 8 within the limits), or "auto"/absent for the default.',
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json",
        description=(
            '"b64_json": base64 images in the answer; "url": links to the stored images under '
            "`/v1/files/`, valid for `jobs.file_ttl_s`."
        ),
    )
    user: Optional[str] = Field(None, max_length=256, description="End-user id, written to the request log.")

    def parsed_size(self) -> tuple[Optional[int], Optional[int]]:
        if self.size is None or self.size == "auto":
            return None, None
        width, height = _SIZE.match(self.size).groups()
        return int(width), int(height)


class ImageGenerationRequest(_OpenAIImageOptions, _Encoded, _Hires, _Refined, _Settings, _Prompted):
    """OpenAI-compatible `POST /v1/images/generations` body."""


class ImageEditRequest(_OpenAIImageOptions, _Encoded, _InpaintOptions, _Settings, _Prompted):
    """OpenAI-compatible `POST /v1/images/edits` form: `image`, optional `mask` (PNG whose fully
    transparent pixels mark the area to edit). Without a mask, an image with transparency is
    inpainted there; an opaque one is transformed as a whole (img2img)."""

    image: ImageUpload = Field(..., description="The image to edit.")
    mask: Optional[ImageUpload] = Field(
        None, description="PNG with an alpha channel, same size as image; fully transparent = edit."
    )


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


# --- async jobs and batches ----------------------------------------------------------------------
# A job stores its result, so its params are the native body without `response_format`; a batch
# item also leaves the encoding to the batch (`output_format` once, at the top level).


class Txt2ImgJobParams(_Encoded, _Sized, _Hires, _Refined, _Settings, _Prompted):
    """`params` of a txt2img job: the `/v1/txt2img` body without `response_format`."""


class Img2ImgJobParams(_Encoded, _Sized, _Img2Img, _Refined, _Settings, _Prompted):
    """`params` of an img2img job (base64 `image`)."""


class InpaintJobParams(_Encoded, _Sized, _Inpaint, _Settings, _Prompted):
    """`params` of an inpaint job (base64 `image` and `mask`)."""


class Txt2ImgItemParams(_Sized, _Hires, _Refined, _Settings, _Prompted):
    """A txt2img request in a batch."""


class Img2ImgItemParams(_Sized, _Img2Img, _Refined, _Settings, _Prompted):
    """An img2img request in a batch (base64 `image`)."""


class InpaintItemParams(_Sized, _Inpaint, _Settings, _Prompted):
    """An inpaint request in a batch (base64 `image` and `mask`)."""


class SharedTxt2ImgParams(_Sized, _Hires, _Refined, _Settings):
    """Settings every prompt of a `prompts` batch shares (everything but the prompt)."""


def _no_credentials(url: HttpUrl) -> HttpUrl:
    # Credentials in a URL end up in logs and databases; put a token in a path or query instead
    # (query values are redacted from logs).
    if url.username or url.password:
        raise ValueError("must not carry a user:password@ part")
    return url


WebhookUrl = Annotated[
    HttpUrl,
    AfterValidator(_no_credentials),
    Field(description="http(s) URL that gets a POST of the final job state; no user:password@ part."),
]


class _JobOptions(_Strict):
    n: int = Field(1, ge=1, description="Images to make (seed, seed + 1, ...); more than one gives a ZIP.")
    webhook_url: Optional[WebhookUrl] = None


class Txt2ImgJob(_JobOptions):
    kind: Literal["txt2img"]
    params: Txt2ImgJobParams


class Img2ImgJob(_JobOptions):
    kind: Literal["img2img"]
    params: Img2ImgJobParams


class InpaintJob(_JobOptions):
    kind: Literal["inpaint"]
    params: InpaintJobParams


#: `POST /v1/jobs`: any native request, run in the background; `kind` says which.
JobSubmission = Annotated[Union[Txt2ImgJob, Img2ImgJob, InpaintJob], Field(discriminator="kind")]


class Txt2ImgItem(_Strict):
    kind: Literal["txt2img"] = "txt2img"
    params: Txt2ImgItemParams


class Img2ImgItem(_Strict):
    kind: Literal["img2img"]
    params: Img2ImgItemParams


class InpaintItem(_Strict):
    kind: Literal["inpaint"]
    params: InpaintItemParams


def _item_kind(value: Any) -> Optional[str]:
    # A batch item without `kind` is txt2img.
    return value.get("kind", "txt2img") if isinstance(value, dict) else getattr(value, "kind", None)


BatchItem = Annotated[
    Union[
        Annotated[Txt2ImgItem, Tag("txt2img")],
        Annotated[Img2ImgItem, Tag("img2img")],
        Annotated[InpaintItem, Tag("inpaint")],
    ],
    Discriminator(_item_kind),
]

#: A batch is either `prompts` (+ shared `params`) or `requests`, never both; a webhook needs async.
_BATCH_RULES = {
    "oneOf": [
        {"required": ["prompts"], "not": {"required": ["requests"]}},
        {"required": ["requests"], "not": {"anyOf": [{"required": ["prompts"]}, {"required": ["params"]}]}},
    ],
    "dependentSchemas": {"webhook_url": {"required": ["async"], "properties": {"async": {"const": True}}}},
}


class BatchRequest(_Encoded):
    """`POST /v1/images/batch`: many requests, one ZIP (images + manifest.json)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, json_schema_extra={**_COMPRESSION_NEEDS_LOSSY, **_BATCH_RULES})

    # Not nullable (absent is the only "none"), so the schema's oneOf above is exact.
    prompts: list[Prompt] = Field(None, min_length=1, description="Text-to-image prompts sharing `params`.")
    params: SharedTxt2ImgParams = Field(None, description="With `prompts`: the settings they share.")
    requests: list[BatchItem] = Field(None, min_length=1, description="Full requests, each with its kind.")
    run_async: bool = Field(False, alias="async", description="Answer 202 with a job whose result is the ZIP.")
    webhook_url: Optional[WebhookUrl] = None


class ControlNetInfo(BaseModel):
    """A served ControlNet (`GET /v1/controlnets`)."""

    object: Literal["controlnet"] = "controlnet"
    name: str = Field(..., description="What requests give as `controlnet.name`.")
    variant: str = Field(..., description="The deployment hosting it; a request combines only ControlNets of one variant.")
    deployment: str = Field(..., description="The Ray Serve deployment name.")
    source: str = Field(..., description="Where its weights come from (`tiny`, `pretrained`, `single_file`, `sdxl-arch`).")
    hosted_with: list[str] = Field(..., description="The other ControlNets of its deployment (combinable with it).")


class ControlNetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ControlNetInfo]


class PreprocessRequest(CannyThresholds):
    """`POST /v1/controlnets/preprocess`: the map a preprocessor makes of a picture."""

    image: ImageUpload = Field(..., description="The picture to make the map from.")
    preprocess: Preprocessor = Field(..., description="The preprocessor (`canny`).")


class LoraInfo(BaseModel):
    """A registered LoRA (`GET /v1/loras`)."""

    name: str
    bytes: Optional[int] = None
    format: Optional[str] = Field(None, description='"diffusers" (PEFT keys) or "kohya".')
    rank: Optional[int] = None
    components: list[str] = Field(default_factory=list, description="unet, text_encoder, text_encoder_2")
    layers: Optional[int] = None
    builtin: bool = Field(False, description="Shipped with the server (read-only).")
    fits: bool = Field(..., description="It applies to the served model.")
    error: Optional[str] = Field(None, description="Why it does not fit.")


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraInfo]


# --- LoRA training -------------------------------------------------------------------------------


class LoraTrainingForm(LoraTrainingSettings):
    """The text fields of `POST /v1/loras/train` (multipart/form-data): the training settings
    (the contract's `LoraTrainingSettings`, bounds defined there) and an optional webhook. The
    examples are file parts: repeated `images` with one `captions` part each, or a `dataset` ZIP."""

    webhook_url: Optional[WebhookUrl] = None


#: What the form states about its examples (`serve_app.openapi.training_body` adds the limits).
TRAINING_EXAMPLE_PARTS = {
    "images": {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string", "format": "binary"},
        "description": (
            "The training images (PNG, JPEG or WEBP; each side at least half the resolution): one file part "
            "named `images` per image, repeated. Each is resized so its short side is `resolution`, then "
            "centre-cropped to a square."
        ),
    },
    "captions": {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string", "maxLength": MAX_CAPTION_CHARS},
        "description": (
            "One text part named `captions` per image, repeated, in the images' order (the caption of the "
            "i-th `images` part is the i-th `captions` part; surrounding whitespace is removed)."
        ),
    },
    "dataset": {
        "type": "string",
        "format": "binary",
        "description": (
            "Instead of images and captions: one ZIP of images (.png, .jpg, .jpeg, .webp), each with a "
            "caption file of the same name ending in .txt (UTF-8) in the same folder (cat.png + cat.txt); "
            "folders are fine, other files are ignored."
        ),
    },
}

#: Examples come one way: images with captions, or a dataset ZIP.
TRAINING_EXAMPLE_RULES = {
    "oneOf": [
        {"required": ["images", "captions"], "not": {"required": ["dataset"]}},
        {"required": ["dataset"], "not": {"anyOf": [{"required": ["images"]}, {"required": ["captions"]}]}},
    ],
}


class JobProgress(BaseModel):
    step: int
    total: int
    percent: float


class JobLinks(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    self_: str = Field(..., alias="self", description="The job (`GET`).")
    result: str = Field(..., description="Its result once it succeeded.")
    events: str = Field(..., description="Server-sent events of its progress.")
    cancel: str = Field(..., description="`DELETE` cancels it.")


class JobView(BaseModel):
    """A job as `GET /v1/jobs/{id}` shows it, with its links."""

    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    kind: str = Field(..., description="txt2img, img2img, inpaint, batch or lora_training.")
    images: int
    progress: JobProgress
    created_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    attempts: int
    error: Optional[dict[str, Any]] = None
    seeds: list[int] = Field(default_factory=list)
    result: Optional[dict[str, Any]] = None
    training: Optional[dict[str, Any]] = Field(
        None, description="A training job's latest loss, ETA and whether it is paused (training jobs only)."
    )
    links: JobLinks
