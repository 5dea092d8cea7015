"""Response image encoding."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serve_app import png as png_module
from serve_app.encoding import encode_image
from serve_app.png import encode_png


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


# -- the threaded PNG encoder (serve_app/png.py) --------------------------------------------------


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk, checking each CRC as a strict decoder would."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind, payload = png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + payload), kind
        chunks.append((kind, payload))
        offset += 12 + length
    return chunks


@pytest.mark.parametrize(
    "height, width",
    [(1, 1), (5, 7), (63, 10), (64, 3), (257, 33), (1024, 96)],  # one part, and 1-4 parts with uneven rows
)
def test_png_round_trips_at_every_size_and_part_count(height, width):
    pixels = np.random.default_rng(height).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    pixels[height // 2 :] //= 3  # rows unlike those above them: the Up filter's wrap-around
    png = encode_png(pixels)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), pixels)
    kinds = [kind for kind, _ in _chunks(png)]
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    # The joined parts are one zlib stream whose checksum (Adler-32) covers the whole image.
    idat = dict(_chunks(png))[b"IDAT"]
    assert len(zlib.decompress(idat)) == height * (width * 3 + 1)


def test_png_parts_follow_the_image_height():
    assert png_module._part_bounds(10, 31, 4) == [0, 310]  # a small image: one part, no thread
    bounds = png_module._part_bounds(1024, 3073, png_module.PARTS)
    assert len(bounds) == png_module.PARTS + 1 and bounds[-1] == 1024 * 3073
    assert all(bound % 3073 == 0 for bound in bounds)  # parts end on row boundaries


def test_png_is_as_small_as_pillows_on_an_image_like_a_render():
    y, x = np.mgrid[0:256, 0:256] / 256
    smooth = (np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x * y), np.sin(9 * x * y)], -1) * 110 + 128)
    pixels = smooth.astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=png_module.COMPRESS_LEVEL)
    assert len(encode_png(pixels)) <= 1.1 * len(buffer.getvalue())
