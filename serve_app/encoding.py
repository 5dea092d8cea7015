"""Image encoding for responses: uint8 pixels -> PNG / JPEG / WEBP bytes. PNG by `serve_app.png`,
JPEG and WEBP by Pillow (no torch)."""

import base64
import io
from typing import Optional

import numpy as np
from PIL import Image

from serve_app.png import check_rgb8, encode_png

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

#: OpenAI's default `output_compression` for jpeg/webp: 100, the best quality.
DEFAULT_QUALITY = 100


def encode_image(pixels: np.ndarray, output_format: str, quality: Optional[int] = None) -> bytes:
    """Encode (H, W, 3) uint8 pixels. `quality` (0-100) applies to jpeg and webp only."""
    check_rgb8(pixels)
    if output_format == "png":
        return encode_png(pixels)  # several threads; Pillow's encoder deflates on one
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=DEFAULT_QUALITY if quality is None else quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=DEFAULT_QUALITY if quality is None else quality)
    else:
        raise ValueError(f"unknown output_format {output_format!r}")
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
