"""Response image encoding."""

import io

import numpy as np
import pytest
from PIL import Image

from serve_app.encoding import encode_image


@pytest.fixture()
def pixels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_formats_decode_to_the_same_size(pixels, fmt, pil_format):
    image = Image.open(io.BytesIO(encode_image(pixels, fmt)))
    assert image.format == pil_format and image.size == (40, 24) and image.mode == "RGB"


def test_png_is_lossless(pixels):
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(pixels, "png")))), pixels)


def test_quality_changes_jpeg_size(pixels):
    assert len(encode_image(pixels, "jpeg", 10)) < len(encode_image(pixels, "jpeg", 95))


def test_rejects_float_pixels(pixels):
    with pytest.raises(TypeError):
        encode_image(pixels.astype(np.float32), "png")
