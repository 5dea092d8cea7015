"""Uploaded images and masks -> the uint8 arrays an engine request carries. Pillow only (no torch).

The rules, in the order they apply:
- Formats: PNG, JPEG, WEBP (415 for anything else, 400 for bytes that do not decode, 413 over
  `limits.max_upload_bytes`, or over `limits.max_input_pixels` pixels: read from the header, before
  any pixel is decoded, so a small file that would decode huge costs nothing). EXIF orientation is
  applied first, so a phone photo comes out upright.
- Colour: an image with transparency is composited onto white (an OpenAI edit without a mask uses
  its fully transparent pixels as the mask first).
- Size: with an explicit size the image (and mask) is resized to it; with only a width or only a
  height, the other side keeps the image's aspect ratio (rounded to a multiple of 8). Without
  either, the image's own size is used, scaled down (keeping its aspect ratio) to fit
  `limits.max_pixels`, then each side is rounded **down** to a multiple of 8.
- Masks: white (>= 128 after resizing) is repainted. Native masks are read as greyscale; OpenAI
  edit masks are PNGs whose fully transparent pixels mark the area to edit. A mask must have the
  same size as its image.
"""

import io
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from configs.app_args import LimitsConfig
from deployments.types import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

SUPPORTED_FORMATS = {"PNG", "JPEG", "WEBP"}


@dataclass
class PreparedImage:
    """An init image (and mask) at the size the engine will generate."""

    pixels: np.ndarray  # (H, W, 3) uint8
    mask: Optional[np.ndarray]  # (H, W) uint8, 255 = repaint; None for img2img


def open_image(data: bytes, param: str, limits: LimitsConfig) -> Image.Image:
    """Decode and orient an uploaded image; errors name `param`."""
    if len(data) > limits.max_upload_bytes:
        raise PayloadTooLargeError(
            f"{param} is {len(data)} bytes; the limit is {limits.max_upload_bytes}", param=param, code="file_too_large"
        )
    if not data:
        raise InvalidRequestError(f"{param} is empty", param=param, code="invalid_image")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise InvalidRequestError(
            f"{param} is not a readable PNG, JPEG or WEBP image", param=param, code="invalid_image"
        ) from None
    except Image.DecompressionBombError:  # Pillow's own bound (~179 M pixels), above ours
        raise _too_many_pixels(param, f"larger than {Image.MAX_IMAGE_PIXELS * 2} pixels", limits) from None
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedMediaTypeError(
            f"{param} is {image.format}; send PNG, JPEG or WEBP", param=param, code="unsupported_image_format"
        )
    if image.width * image.height > limits.max_input_pixels:
        raise _too_many_pixels(param, f"{image.width}x{image.height}", limits)
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError):
        raise InvalidRequestError(f"{param} is corrupt or truncated", param=param, code="invalid_image") from None


def _too_many_pixels(param: str, size: str, limits: LimitsConfig) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{param} is {size}, over the {limits.max_input_pixels} pixels an upload may have "
        "(limits.max_input_pixels); scale it down before sending",
        param=param,
        code="image_too_large",
    )


def target_size(
    image_size: tuple[int, int], requested: tuple[Optional[int], Optional[int]], limits: LimitsConfig, param: str
) -> tuple[int, int]:
    """The generation size: the requested one (one side given: the other keeps the image's aspect
    ratio, rounded to a multiple of 8), or the image's, fitted to the limits (see module doc)."""
    width, height = requested
    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, _multiple_of_8(width * image_size[1] / image_size[0])
    if height is not None:
        return _multiple_of_8(height * image_size[0] / image_size[1]), height
    width, height = image_size
    if width * height > limits.max_pixels:
        scale = math.sqrt(limits.max_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
    width, height = width // 8 * 8, height // 8 * 8
    if min(width, height) < limits.min_side:
        raise InvalidRequestError(
            f"{param} is {image_size[0]}x{image_size[1]}; each side must be at least {limits.min_side} pixels",
            param=param,
            code="invalid_size",
        )
    return width, height


def _multiple_of_8(side: float) -> int:
    return max(8, round(side / 8) * 8)


def flatten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def transparent_area(image: Image.Image) -> Optional[Image.Image]:
    """An L mask, white where the image is fully transparent; None when no pixel is."""
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return None
    alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
    if not (alpha == 0).any():
        return None
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))


def greyscale_mask(image: Image.Image) -> Image.Image:
    """A native inpaint mask: its luminance (alpha ignored), white = repaint."""
    return image.convert("L")


def prepare(
    image: Image.Image,
    mask: Optional[Image.Image],
    size: tuple[int, int],
) -> PreparedImage:
    """Resize image (and mask, which must match the image's size) to `size` as engine arrays."""
    if mask is not None and mask.size != image.size:
        raise InvalidRequestError(
            f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}",
            param="mask",
            code="mask_size_mismatch",
        )
    rgb = flatten(image)
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    mask_pixels = None
    if mask is not None:
        if mask.size != size:
            mask = mask.resize(size, Image.Resampling.BILINEAR)
        mask_pixels = np.asarray(mask.convert("L"), dtype=np.uint8).copy()
    return PreparedImage(pixels=np.asarray(rgb, dtype=np.uint8).copy(), mask=mask_pixels)


def rgb_pixels(picture: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A decoded control image (or picture to preprocess) as uint8 RGB at `size`, resized as
    init images are."""
    return prepare(picture.convert("RGB"), None, size).pixels
