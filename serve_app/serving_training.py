"""Serving logic of LoRA training jobs (`POST /v1/loras/train`): read the form's settings and
examples, check them against the deployment's limits, turn each image into the `resolution`-square
uint8 array the trainer takes, and queue the job. No torch here.

The examples come one way or the other, never both:
- repeated `images` file parts, each with a `captions` part (text, or a UTF-8 file), paired in
  order: the i-th caption is the i-th image's;
- one `dataset` ZIP of images (.png, .jpg, .jpeg, .webp), each with a caption file of the same
  stem ending in `.txt` in the same folder (`cats/1.png` + `cats/1.txt`). Folders are fine; other
  files, hidden files and `__MACOSX/` are ignored; an image without its caption file is refused.

Every refusal is a `ServiceError` naming the field: `rank`, `images.3`, `captions.3`,
`dataset:cats/1.png`. The ZIP is read from the spooled upload, never extracted: a member's path
is still refused when it would leave the archive (`../`, absolute), and the archive's members and
their declared uncompressed bytes are bounded before anything is decompressed, each member read
no further than its declared size (a ZIP bomb stops at its headers or at its CRC).
"""

import asyncio
import math
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Optional

import numpy as np
from PIL import Image
from pydantic import ValidationError

from configs.app_args import AppArgs
from deployments.lora_registry import LoraRegistry, check_name
from deployments.training import (
    MAX_CAPTION_CHARS,
    MIN_TRAINING_IMAGES,
    LoraTrainingSettings,
    TrainingExample,
)
from deployments.types import (
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from serve_app.errors import invalid_request_from
from serve_app.image_inputs import flatten, open_image
from serve_app.jobs import webhooks
from serve_app.jobs.training_payload import TRAINING_KIND, TrainingPayload
from serve_app.protocol import LoraTrainingForm
from serve_app.auth import ANONYMOUS, Principal
from serve_app.serving_jobs import job_owner, links

#: Image files a dataset ZIP may hold (decoded as PNG, JPEG or WEBP whatever their name says).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIX = ".txt"
#: Image files this server does not read: refused by name (415) rather than silently skipped.
_OTHER_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl")
#: Bytes a caption file may have: MAX_CAPTION_CHARS characters of up to 4 UTF-8 bytes, a BOM, a newline.
_MAX_CAPTION_BYTES = 4 * MAX_CAPTION_CHARS + 8
#: Members a dataset ZIP may have beyond an image and a caption per example (folders, stray files).
_ZIP_SLACK_MEMBERS = 100
#: Text parts of the form besides the captions: the settings and the webhook (with room to spare,
#: so an unknown field is answered by name rather than by the form parser's count).
_MAX_SETTING_FIELDS = 32
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass
class _Form:
    """The form's parts, sorted: settings text fields, image file parts, captions (text or file
    parts) and the dataset ZIP."""

    fields: dict[str, str] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)
    captions: list[Any] = field(default_factory=list)
    dataset: Optional[Any] = None


class TrainingServing:
    def __init__(self, args: AppArgs, registry: LoraRegistry, manager: Any, call: Any):
        """`registry`: the LoRA registry (a new LoRA's name must be free); `manager`: the job
        manager's handle; `call`: how the app awaits a handle call (mapping Ray's failures)."""
        self._args = args
        self._registry = registry
        self._manager = manager
        self._call = call
        self.enabled = args.trains_loras()

    def check_enabled(self) -> None:
        """404 unless this deployment trains LoRAs (`enabled`)."""
        if self.enabled:
            return
        if not self._args.training.enabled:
            raise NotFoundError("LoRA training is disabled on this deployment (training.enabled)", code="training_disabled")
        raise NotFoundError("this deployment serves no LoRAs (limits.max_loras is 0), so it trains none", code="training_disabled")

    def form_limits(self) -> dict[str, int]:
        """Bounds for the multipart parser: an image and a caption file per example, or a ZIP."""
        most = self._args.training.max_images
        return {"max_files": 2 * most + 1, "max_fields": most + _MAX_SETTING_FIELDS}

    async def submit(self, items: list[tuple[str, Any]], principal: Principal = ANONYMOUS) -> dict[str, Any]:
        """Queue a training job of `principal` from the form's `(name, value)` parts (text as
        `str`, files as objects with `.file` and `.size`); answers the job's view and links."""
        self.check_enabled()
        form = _split(items)
        # Decoding and resizing images is CPU work, and reading files blocks: off the event loop.
        settings, examples, webhook_url = await asyncio.to_thread(self._prepare, form)
        view = await self._call(
            self._manager.submit, TrainingPayload(settings, examples), TRAINING_KIND, webhook_url, *job_owner(principal)
        )
        return {**view, "links": links(view["id"])}

    # -- settings --------------------------------------------------------------------------------

    def _prepare(self, form: _Form) -> tuple[LoraTrainingSettings, list[TrainingExample], Optional[str]]:
        settings, webhook_url = self._settings(form.fields)
        if form.dataset is not None:
            if form.images or form.captions:
                raise InvalidRequestError(
                    "send the examples one way: images with captions, or a dataset ZIP, not both",
                    param="dataset",
                    code="conflicting_examples",
                )
            examples = self._zip_examples(form.dataset, settings)
        else:
            examples = self._form_examples(form, settings)
        return settings, examples, webhook_url

    def _settings(self, fields: dict[str, str]) -> tuple[LoraTrainingSettings, Optional[str]]:
        values = dict(fields)
        if "name" in values:  # the registry's own rules and messages (e.g. no paths, no pickle names)
            values["name"] = check_name(values["name"], "name")
        try:
            form = LoraTrainingForm.model_validate(values)
        except ValidationError as exc:
            raise invalid_request_from(exc.errors()) from None
        # A default never exceeds this deployment's limit: a form without `rank` or `steps` is not
        # refused for a value it did not give.
        fitted = {
            name: most
            for name, most in (("rank", self._args.loras.max_rank), ("steps", self._args.training.max_steps))
            if name not in form.model_fields_set and getattr(form, name) > most
        }
        form = form.model_copy(update=fitted)
        if form.rank > self._args.loras.max_rank:
            raise InvalidRequestError(
                f"rank {form.rank} is above the largest rank this deployment serves ({self._args.loras.max_rank}, "
                "loras.max_rank)",
                param="rank",
                code="lora_rank_too_high",
            )
        if form.steps > self._args.training.max_steps:
            raise InvalidRequestError(
                f"steps {form.steps} is above the limit of {self._args.training.max_steps} (training.max_steps)",
                param="steps",
                code="invalid_steps",
            )
        self._registry.check_free(form.name)
        settings = LoraTrainingSettings.model_validate(form.model_dump(exclude={"webhook_url"}))
        webhook_url = None if form.webhook_url is None else str(form.webhook_url)
        webhooks.check_submitted(webhook_url, self._args.jobs.webhook_allow)  # 400 for an internal literal host
        return settings.with_defaults(self._args.model.default_size[0]), webhook_url

    def _check_count(self, count: int, param: str, settings: LoraTrainingSettings) -> None:
        most = self._args.training.max_images
        if count < MIN_TRAINING_IMAGES:
            raise InvalidRequestError(
                f"{param} holds no images (.png, .jpg, .jpeg, .webp); training needs at least {MIN_TRAINING_IMAGES}",
                param=param,
                code="no_images",
            )
        if count > most:
            raise InvalidRequestError(
                f"{param} has {count} images; the limit is {most} (training.max_images)",
                param=param,
                code="too_many_images",
            )
        if settings.batch_size > count:
            raise InvalidRequestError(
                f"batch_size {settings.batch_size} is more than the {count} examples sent",
                param="batch_size",
                code="batch_size_too_large",
            )

    # -- examples as form parts ------------------------------------------------------------------

    def _form_examples(self, form: _Form, settings: LoraTrainingSettings) -> list[TrainingExample]:
        if not form.images:
            raise InvalidRequestError(
                "send the examples: repeated images file parts with a captions part each, or a dataset ZIP",
                param="images",
                code="missing",
            )
        self._check_count(len(form.images), "images", settings)
        if len(form.captions) != len(form.images):
            raise InvalidRequestError(
                f"{len(form.images)} images but {len(form.captions)} captions; send one captions part per image, "
                "in the images' order",
                param="captions",
                code="missing" if not form.captions else "caption_count_mismatch",
            )
        captions = [_caption_of_part(value, f"captions.{index}") for index, value in enumerate(form.captions)]
        examples = []
        for index, (upload, caption) in enumerate(zip(form.images, captions)):
            param = f"images.{index}"
            data = _read_upload(upload, self._args.limits.max_upload_bytes)
            examples.append(TrainingExample(self._pixels(data, param, settings.resolution), caption))
        return examples

    # -- examples as a ZIP -----------------------------------------------------------------------

    def _zip_examples(self, upload: Any, settings: LoraTrainingSettings) -> list[TrainingExample]:
        upload.file.seek(0)
        try:
            archive = zipfile.ZipFile(upload.file)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError):
            raise InvalidRequestError("dataset is not a readable ZIP archive", param="dataset", code="invalid_zip") from None
        with archive:
            members = archive.infolist()
            most = 2 * self._args.training.max_images + _ZIP_SLACK_MEMBERS
            if len(members) > most:
                raise InvalidRequestError(
                    f"dataset has {len(members)} entries; the limit is {most} (an image and a caption per example)",
                    param="dataset",
                    code="too_many_files",
                )
            pairs = _pairs(members)
            self._check_count(len(pairs), "dataset", settings)
            total = sum(image.file_size + caption.file_size for image, caption in pairs)
            if total > self._args.training.max_upload_bytes:
                raise PayloadTooLargeError(
                    f"dataset unpacks to {total} bytes; the limit is {self._args.training.max_upload_bytes} "
                    "(training.max_upload_bytes)",
                    param="dataset",
                    code="zip_too_large",
                )
            examples = []
            for image, caption in pairs:
                caption_param = f"dataset:{caption.filename}"
                if caption.file_size > _MAX_CAPTION_BYTES:
                    raise _caption_too_long(caption_param)
                text = _caption_text(_read_member(archive, caption), caption_param)
                param = f"dataset:{image.filename}"
                if image.file_size > self._args.limits.max_upload_bytes:
                    raise PayloadTooLargeError(
                        f"{param} is {image.file_size} bytes; the limit is {self._args.limits.max_upload_bytes}",
                        param=param,
                        code="file_too_large",
                    )
                examples.append(TrainingExample(self._pixels(_read_member(archive, image), param, settings.resolution), text))
        return examples

    # -- images ----------------------------------------------------------------------------------

    def _pixels(self, data: bytes, param: str, resolution: int) -> np.ndarray:
        """An uploaded image as uint8 RGB, `resolution` square: its short side resized to
        `resolution` (LANCZOS), then centre-cropped. Images below half the resolution are refused
        (upscaled more than 2x, they would teach blur)."""
        image = flatten(open_image(data, param, self._args.limits))
        width, height = image.size
        if 2 * min(width, height) < resolution:
            raise InvalidRequestError(
                f"{param} is {width}x{height}; training at resolution {resolution} needs each side to be at least "
                f"{math.ceil(resolution / 2)} pixels",
                param=param,
                code="image_too_small",
            )
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        return np.asarray(image, dtype=np.uint8).copy()


def _split(items: list[tuple[str, Any]]) -> _Form:
    form = _Form()
    for key, value in items:
        name = key.removesuffix("[]")  # some clients name repeated parts `images[]`
        is_file = not isinstance(value, str)
        if name == "images":
            if not is_file:
                param = f"images.{len(form.images)}"
                raise InvalidRequestError(f"{param} must be a file part (an image)", param=param, code="invalid_image")
            form.images.append(value)
        elif name == "captions":
            form.captions.append(value)
        elif name == "dataset":
            if not is_file:
                raise InvalidRequestError("dataset must be a file part (a ZIP)", param="dataset", code="invalid_zip")
            if form.dataset is not None:
                raise InvalidRequestError("dataset was given more than once; send one", param=name, code="duplicate_field")
            form.dataset = value
        elif is_file:
            if name in LoraTrainingForm.model_fields:
                raise InvalidRequestError(f"{name} must be a text part, not a file", param=name, code="invalid_value")
            raise InvalidRequestError(f"unrecognized request argument: {name}", param=name, code="extra_forbidden")
        else:
            if name in form.fields:
                raise InvalidRequestError(f"{name} was given more than once; send one", param=name, code="duplicate_field")
            form.fields[name] = value
    return form


def _read_upload(upload: Any, limit: int) -> bytes:
    """A file part's bytes, at most `limit` + 1 read (`open_image` answers the 413 beyond)."""
    upload.file.seek(0)
    return upload.file.read(limit + 1)


def _caption_of_part(value: Any, param: str) -> str:
    if isinstance(value, str):
        return _checked_caption(value, param)
    data = _read_upload(value, _MAX_CAPTION_BYTES)
    if len(data) > _MAX_CAPTION_BYTES:
        raise _caption_too_long(param)
    return _caption_text(data, param)


def _caption_text(data: bytes, param: str) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{param} is not UTF-8 text", param=param, code="invalid_caption") from None
    return _checked_caption(text, param)


def _checked_caption(text: str, param: str) -> str:
    text = text.strip()
    if len(text) > MAX_CAPTION_CHARS:
        raise _caption_too_long(param)
    return text


def _caption_too_long(param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{param} is longer than {MAX_CAPTION_CHARS} characters", param=param, code="caption_too_long"
    )


def _pairs(members: list[zipfile.ZipInfo]) -> list[tuple[zipfile.ZipInfo, zipfile.ZipInfo]]:
    """Each image of the archive with its caption file (same folder, same stem, `.txt`), in
    path order; 400 for an unsafe path or an image without a caption."""
    images: list[tuple[str, zipfile.ZipInfo]] = []
    captions: dict[str, zipfile.ZipInfo] = {}
    for info in members:
        path = _member_path(info.filename)
        if info.is_dir() or any(part.startswith(".") or part == "__MACOSX" for part in path.parts):
            continue
        suffix = path.suffix.lower()
        key = str(path.with_suffix(""))
        if suffix in IMAGE_SUFFIXES:
            images.append((key, info))
        elif suffix == CAPTION_SUFFIX:
            captions[key] = info
        elif suffix in _OTHER_IMAGE_SUFFIXES:
            param = f"dataset:{info.filename}"
            raise UnsupportedMediaTypeError(
                f"{param} is a {suffix} image; send PNG, JPEG or WEBP", param=param, code="unsupported_image_format"
            )
    pairs = []
    for key, info in sorted(images, key=lambda item: item[1].filename):
        caption = captions.get(key)
        if caption is None:
            param = f"dataset:{info.filename}"
            raise InvalidRequestError(
                f"{param} has no caption: put its caption in {key}{CAPTION_SUFFIX} beside it",
                param=param,
                code="missing_caption",
            )
        pairs.append((info, caption))
    return pairs


def _member_path(name: str) -> PurePosixPath:
    """A member's path inside the archive; 400 when it would leave it (absolute, `..`)."""
    normalised = name.replace("\\", "/")
    path = PurePosixPath(normalised)
    if normalised.startswith("/") or _DRIVE.match(normalised) or ".." in path.parts:
        param = f"dataset:{name}"
        raise InvalidRequestError(
            f"{param} has a path outside the archive; use relative paths without '..'", param=param, code="unsafe_zip_path"
        )
    return path


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, decompressed in bounded steps and never past its declared size (a header
    that lies fails the CRC check instead of inflating more); 400 for a damaged or encrypted
    member, or one compressed otherwise than stored or deflated (every ZIP tool's default, and
    the methods whose output zipfile bounds per step)."""
    param = f"dataset:{info.filename}"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InvalidRequestError(
            f"{param} is compressed with method {info.compress_type}; store or deflate it", param=param, code="invalid_zip"
        )
    try:
        with archive.open(info) as member:
            return member.read(info.file_size)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError, OSError, ValueError):
        raise InvalidRequestError(
            f"{param} cannot be read (damaged or encrypted)", param=param, code="invalid_zip"
        ) from None
