"""PNG encoding of response images: Pillow (zlib level 1, one thread, adaptive row filters)
against `serve_app.png` (Up filter, deflated in parts on a thread pool), at 1024² on a photo-like
image and on noise (what random-weight SDXL draws, the GPU benchmarks' images). CPU only.

    python benchmarks/bench_encoding.py --out bench-out

Prints a table (best of --repeats, ms, and file size) and writes `bench_encoding.json` to --out.
"""

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app import png  # noqa: E402


def photo_like(size: int) -> np.ndarray:
    """Smooth colour fields with a little sensor-like noise: compresses as a render does."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x * y), np.sin(9 * x * y)], -1) * 0.5 + 0.5
    noisy = base * 220 + np.random.default_rng(0).normal(0, 6, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def noise(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def pillow_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=png.COMPRESS_LEVEL)
    return buffer.getvalue()


def best_ms(encode, pixels: np.ndarray, repeats: int) -> tuple[float, int]:
    times, data = [], b""
    for _ in range(repeats):
        started = time.perf_counter()
        data = encode(pixels)
        times.append(time.perf_counter() - started)
    return min(times) * 1000, len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    encoders = {"pillow": pillow_png, **{f"ours, {n} part(s)": (lambda p, n=n: png.encode_png(p, parts=n)) for n in (1, 2, 4)}}
    rows = []
    for image_name, pixels in (("photo-like", photo_like(args.size)), ("noise", noise(args.size))):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.encode_png(pixels)))), pixels)
        for encoder_name, encode in encoders.items():
            ms, size = best_ms(encode, pixels, args.repeats)
            rows.append({"image": image_name, "encoder": encoder_name, "ms": round(ms, 1), "bytes": size})
    print(f"{'image':<12}{'encoder':<18}{'ms':>8}{'bytes':>11}")
    for row in rows:
        print(f"{row['image']:<12}{row['encoder']:<18}{row['ms']:>8.1f}{row['bytes']:>11}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_encoding",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "settings": {"size": args.size, "repeats": args.repeats, "level": png.COMPRESS_LEVEL},
        "rows": rows,
    }
    (args.out / "bench_encoding.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'bench_encoding.json'}")


if __name__ == "__main__":
    main()
