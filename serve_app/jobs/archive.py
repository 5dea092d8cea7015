"""Results as files: one encoded image, or a ZIP of images plus `manifest.json`."""

import io
import json
import zipfile
from typing import Any, Optional

from deployments.types import GenerationRequest, GenerationResult
from serve_app.encoding import MEDIA_TYPES, encode_image

_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def manifest_entry(file_name: str, request: GenerationRequest, result: GenerationResult) -> dict[str, Any]:
    """What made one file: its request (without pixel data), seed and timings."""
    settings = request.model_dump(exclude={"init_image", "mask_image", "controlnets", "deadline", "seed"}, exclude_none=True)
    if request.controlnets:
        settings["controlnets"] = [control.model_dump(exclude={"image"}, exclude_none=True) for control in request.controlnets]
    return {"file": file_name, **settings, "seed": result.seed, "batch_size": result.batch_size, "timings": result.timings}


def build_result(
    requests: list[GenerationRequest],
    results: list[GenerationResult],
    output_format: str,
    quality: Optional[int],
    archive: bool,
) -> tuple[bytes, str, str]:
    """(bytes, media type, file name): the image itself when there is one and no archive is
    asked for, else a ZIP holding every image and `manifest.json`."""
    extension = _EXTENSIONS[output_format]
    images = [encode_image(result.image, output_format, quality) for result in results]
    if len(images) == 1 and not archive:
        return images[0], MEDIA_TYPES[output_format], f"image.{extension}"
    names = [f"{index:04d}.{extension}" for index in range(len(images))]
    manifest = {
        "images": [manifest_entry(name, request, result) for name, request, result in zip(names, requests, results)]
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive_file:
        for name, data in zip(names, images):
            archive_file.writestr(name, data)
        archive_file.writestr("manifest.json", json.dumps(manifest, indent=2))
    return buffer.getvalue(), "application/zip", "images.zip"
