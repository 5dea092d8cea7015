"""Decoding and preparing uploaded images and masks (no Ray, no torch)."""

import io

import numpy as np
import pytest
from PIL import Image

from configs.app_args import LimitsConfig
from deployments.types import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from serve_app import image_inputs

LIMITS = LimitsConfig()


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    return Image.fromarray(np.stack([x, x[::-1], np.full_like(x, 128)], axis=2))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_supported_formats_open(fmt):
    image = image_inputs.open_image(_encode(_gradient(80, 64), fmt), "image", LIMITS)
    assert image.size == (80, 64)


def test_gif_is_unsupported_media_type():
    with pytest.raises(UnsupportedMediaTypeError) as info:
        image_inputs.open_image(_encode(_gradient(16, 16), "GIF"), "image", LIMITS)
    assert info.value.status_code == 415 and info.value.param == "image"


@pytest.mark.parametrize("data", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_is_400(data):
    with pytest.raises(InvalidRequestError) as info:
        image_inputs.open_image(data, "mask", LIMITS)
    assert info.value.status_code == 400 and info.value.param == "mask"


def test_truncated_png_is_400():
    data = _encode(_gradient(64, 64), "PNG")
    with pytest.raises(InvalidRequestError):
        image_inputs.open_image(data[: len(data) // 2], "image", LIMITS)


def test_upload_over_the_byte_limit_is_413():
    small = LimitsConfig(max_upload_bytes=1024)
    with pytest.raises(PayloadTooLargeError) as info:
        image_inputs.open_image(b"x" * 1025, "image", small)
    assert info.value.status_code == 413


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = _encode(_gradient(96, 64), "JPEG", exif=exif.tobytes())
    assert image_inputs.open_image(data, "image", LIMITS).size == (64, 96)


def test_rgba_is_flattened_onto_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(image_inputs.flatten(rgba)).min() == 255


def test_transparent_area_marks_fully_transparent_pixels():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :, 3] = 255
    rgba[2:4, 2:4, 3] = 0
    rgba[5, 5, 3] = 100  # half transparent: kept
    mask = np.asarray(image_inputs.transparent_area(Image.fromarray(rgba)))
    assert mask[2:4, 2:4].min() == 255 and mask.sum() == 4 * 255
    assert image_inputs.transparent_area(Image.new("RGB", (8, 8))) is None
    assert image_inputs.transparent_area(Image.new("RGBA", (8, 8), (0, 0, 0, 255))) is None


@pytest.mark.parametrize(
    "image_size, requested, expected",
    [
        ((100, 70), (None, None), (96, 64)),  # rounded down to multiples of 8
        ((4000, 3000), (None, None), (2360, 1768)),  # scaled to fit max_pixels, aspect kept
        ((100, 70), (64, 128), (64, 128)),  # an explicit size wins
        ((400, 300), (200, None), (200, 152)),  # one side: the other keeps the aspect (150 → 152)
        ((400, 300), (None, 96), (128, 96)),
    ],
)
def test_target_size_rule(image_size, requested, expected):
    size = image_inputs.target_size(image_size, requested, LIMITS, "image")
    assert size == expected and size[0] * size[1] <= LIMITS.max_pixels


def test_too_small_image_is_400():
    with pytest.raises(InvalidRequestError) as info:
        image_inputs.target_size((70, 40), (None, None), LIMITS, "image")
    assert info.value.param == "image"


def test_prepare_resizes_image_and_mask():
    mask = Image.new("L", (100, 70), 0)
    prepared = image_inputs.prepare(_gradient(100, 70), mask, (96, 64))
    assert prepared.pixels.shape == (64, 96, 3) and prepared.pixels.dtype == np.uint8
    assert prepared.mask.shape == (64, 96)


def test_mask_of_another_size_is_400():
    with pytest.raises(InvalidRequestError) as info:
        image_inputs.prepare(_gradient(64, 64), Image.new("L", (64, 72)), (64, 64))
    assert info.value.param == "mask" and info.value.code == "mask_size_mismatch"
