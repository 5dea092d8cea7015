"""`POST /v1/loras/train` in-process over a fake engine and a real job manager (no Ray, no
model): the ingress side of LoRA training. A good form (images + captions, or a dataset ZIP)
queues a `lora_training` job whose stored payload holds the resolved settings and the examples at
the training resolution; every refusal is a 4xx naming the field."""

import io
import json
import sqlite3
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from deployments.training import MAX_CAPTION_CHARS
from serve_app.jobs.training_payload import TRAINING_KIND, TrainingPayload
from tests.fakes import FakeEngine, local_app

pytestmark = pytest.mark.anyio

#: Small limits, so every bound is cheap to cross.
ARGS = {
    "training": {"max_images": 4, "max_steps": 100, "max_upload_bytes": 2 * 1024 * 1024},
    "loras": {"max_rank": 32},
}
#: The tiny model's default size: a form without `resolution` trains at its width.
DEFAULT_WIDTH = 128


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    return _encode(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), fmt)


def _stripes(width: int, height: int) -> bytes:
    """Red left quarter, green middle half, blue right quarter: a centre crop of a 2:1 image at
    its height is all green."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 4] = (255, 0, 0)
    pixels[:, width // 4 : 3 * width // 4] = (0, 255, 0)
    pixels[:, 3 * width // 4 :] = (0, 0, 255)
    return _encode(pixels)


def _transparent(width: int, height: int) -> bytes:
    return _encode(np.zeros((height, width, 4), dtype=np.uint8))  # fully transparent: white once flattened


def _declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _lying_zip() -> bytes:
    """A ZIP whose member says it unpacks to 100 bytes but inflates to 3 MiB (a bomb that lies in
    its headers): its central directory's size field is rewritten."""
    data = bytearray(_zip({"bomb.png": b"\x00" * (3 * 1024 * 1024), "bomb.txt": b"a bomb"}))
    central = data.index(b"PK\x01\x02")  # the first central directory entry: bomb.png
    data[central + 24 : central + 28] = struct.pack("<I", 100)
    return bytes(data)


def _form(fields: dict, images=(), captions=(), dataset=None) -> dict:
    """httpx arguments of a multipart training form: repeated `images` file parts and `captions`
    text parts, in order, or a `dataset` file part."""
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    if dataset is not None:
        files.append(("dataset", ("set.zip", dataset, "application/zip")))
    data = {key: str(value) for key, value in fields.items()}
    if captions:
        data["captions"] = list(captions)
    return {"data": data, "files": files}


GOOD = {"name": "ink", "resolution": 64}


def _stored(state_dir, job_id: str) -> tuple[str, TrainingPayload]:
    """The job's kind and payload as the job manager stored them (its SQLite file)."""
    with sqlite3.connect(state_dir / "jobs" / "jobs.sqlite3") as db:
        kind, payload = db.execute("SELECT kind, payload FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return kind, TrainingPayload.from_json(json.loads(payload))


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    return response.json()["error"]


# --- accepted --------------------------------------------------------------------------------


async def test_images_and_captions_queue_a_training_job(tmp_path):
    fields = {
        "name": "ink", "rank": 8, "steps": 20, "learning_rate": 2e-4, "batch_size": 2, "resolution": 64,
        "train_text_encoder": "true", "trigger_word": "inkstyle", "seed": 7,
    }
    images = [_stripes(128, 64), _transparent(100, 150), _noise(80, 90, fmt="JPEG")]
    captions = ["  a green field\n", "a white page", "noise"]
    async with local_app(FakeEngine(), tmp_path, **ARGS) as client:
        response = await client.post("/v1/loras/train", **_form(fields, images, captions))
        assert response.status_code == 202, response.text
        view = response.json()
        assert view["kind"] == TRAINING_KIND and view["status"] in ("queued", "running")
        assert view["links"] == {
            "self": f"/v1/jobs/{view['id']}", "result": f"/v1/jobs/{view['id']}/result",
            "events": f"/v1/jobs/{view['id']}/events", "cancel": f"/v1/jobs/{view['id']}",
        }
        assert (await client.get(f"/v1/jobs/{view['id']}")).json()["kind"] == TRAINING_KIND
    kind, payload = _stored(tmp_path, view["id"])
    assert kind == TRAINING_KIND
    assert payload.settings.model_dump() == {**fields, "train_text_encoder": True}
    assert [example.caption for example in payload.examples] == ["a green field", "a white page", "noise"]
    assert all(example.image.shape == (64, 64, 3) and example.image.dtype == np.uint8 for example in payload.examples)
    stripes, page, _ = (example.image for example in payload.examples)
    assert (stripes == (0, 255, 0)).all()  # the centre crop of a 2:1 image: no red, no blue
    assert (page == 255).all()  # transparency composited onto white


async def test_defaults_resolve_before_the_job_is_stored(tmp_path):
    """No resolution: the model's default width; no seed: one drawn now (a retry trains the same
    run); no steps: the contract's 500, here above `training.max_steps`, so that limit."""
    async with local_app(FakeEngine(), tmp_path, **ARGS) as client:
        response = await client.post("/v1/loras/train", **_form({"name": "plain"}, [_noise(300, 200)], ["x"]))
        assert response.status_code == 202, response.text
    _, payload = _stored(tmp_path, response.json()["id"])
    settings = payload.settings
    assert settings.resolution == DEFAULT_WIDTH and isinstance(settings.seed, int)
    assert (settings.rank, settings.steps, settings.batch_size, settings.train_text_encoder) == (16, 100, 1, False)
    assert payload.examples[0].image.shape == (DEFAULT_WIDTH, DEFAULT_WIDTH, 3)


async def test_a_dataset_zip_pairs_images_with_their_captions(tmp_path):
    dataset = _zip(
        {
            "set/cats/1.png": _stripes(128, 64),
            "set/cats/1.txt": "\ufeffa cat\n".encode(),  # a BOM and a newline, as editors write them
            "set/dogs/1.jpg": _noise(64, 64, fmt="JPEG"),
            "set/dogs/1.TXT": "a dog".encode(),
            "set/dogs/2.webp": _encode(np.full((96, 96, 3), 9, np.uint8), "WEBP"),
            "set/dogs/2.txt": "".encode(),  # an empty caption is allowed: the trigger word alone
            "__MACOSX/set/cats/._1.png": b"AppleDouble",
            "set/.DS_Store": b"\x00",
            "set/README.md": b"ignored",
        }
    )
    async with local_app(FakeEngine(), tmp_path, **ARGS) as client:
        response = await client.post("/v1/loras/train", **_form({**GOOD, "trigger_word": "pets"}, dataset=dataset))
        assert response.status_code == 202, response.text
    _, payload = _stored(tmp_path, response.json()["id"])
    assert [example.caption for example in payload.examples] == ["a cat", "a dog", ""]
    assert all(example.image.shape == (64, 64, 3) for example in payload.examples)
    assert (payload.examples[0].image == (0, 255, 0)).all()
    assert (payload.examples[2].image == 9).all()


# --- refused ---------------------------------------------------------------------------------


TWO = [_noise(64, 64, seed=1), _noise(64, 64, seed=2)]


@pytest.mark.parametrize(
    "form, status, param, code",
    [
        # settings
        (_form({}, TWO, ["a", "b"]), 400, "name", "missing"),
        (_form({"name": "../x"}, TWO, ["a", "b"]), 400, "name", "invalid_lora_name"),
        (_form({"name": "pastel"}, TWO, ["a", "b"]), 409, "name", "lora_exists"),  # the tiny model's example
        (_form({**GOOD, "rank": 33}, TWO, ["a", "b"]), 400, "rank", "lora_rank_too_high"),
        (_form({**GOOD, "rank": 300}, TWO, ["a", "b"]), 400, "rank", "less_than_equal"),
        (_form({**GOOD, "steps": 101}, TWO, ["a", "b"]), 400, "steps", "invalid_steps"),
        (_form({**GOOD, "learning_rate": "fast"}, TWO, ["a", "b"]), 400, "learning_rate", "float_parsing"),
        (_form({**GOOD, "resolution": 100}, TWO, ["a", "b"]), 400, "resolution", "multiple_of"),
        (_form({**GOOD, "trigger_word": "a,b"}, TWO, ["a", "b"]), 400, "trigger_word", "string_pattern_mismatch"),
        (_form({**GOOD, "webhook_url": "ftp://x/y"}, TWO, ["a", "b"]), 400, "webhook_url", "url_scheme"),
        (_form({**GOOD, "webhook_url": "http://169.254.169.254/x"}, TWO, ["a", "b"]), 400, "webhook_url", "webhook_url_refused"),
        (_form({**GOOD, "epochs": 3}, TWO, ["a", "b"]), 400, "epochs", "extra_forbidden"),
        # how many examples
        (_form(GOOD), 400, "images", "missing"),
        (_form(GOOD, [_noise(64, 64)] * 5, ["a"] * 5), 400, "images", "too_many_images"),
        (_form({**GOOD, "batch_size": 3}, TWO, ["a", "b"]), 400, "batch_size", "batch_size_too_large"),
        (_form(GOOD, TWO), 400, "captions", "missing"),
        (_form(GOOD, TWO, ["a"]), 400, "captions", "caption_count_mismatch"),
        (_form(GOOD, TWO, ["a", "b" * (MAX_CAPTION_CHARS + 1)]), 400, "captions.1", "caption_too_long"),
        (_form(GOOD, TWO, ["a", "b"], dataset=_zip({})), 400, "dataset", "conflicting_examples"),
        # each image
        (_form(GOOD, [TWO[0], b"not an image"], ["a", "b"]), 400, "images.1", "invalid_image"),
        (_form(GOOD, [_noise(64, 64, fmt="GIF")], ["a"]), 415, "images.0", "unsupported_image_format"),
        (_form({**GOOD, "resolution": 128}, [_noise(63, 200)], ["a"]), 400, "images.0", "image_too_small"),
        (_form(GOOD, [_declared_png(20000, 20000)], ["a"]), 413, "images.0", "image_too_large"),
        # the dataset ZIP
        (_form(GOOD, dataset=b"PK not really"), 400, "dataset", "invalid_zip"),
        (_form(GOOD, dataset=_zip({"README.md": b"no images"})), 400, "dataset", "no_images"),
        (_form(GOOD, dataset=_zip({"../evil.png": TWO[0], "../evil.txt": b"x"})), 400, "dataset:../evil.png", "unsafe_zip_path"),
        (_form(GOOD, dataset=_zip({"/abs.png": TWO[0]})), 400, "dataset:/abs.png", "unsafe_zip_path"),
        (_form(GOOD, dataset=_zip({"a/cat.png": TWO[0], "b/cat.txt": b"x"})), 400, "dataset:a/cat.png", "missing_caption"),
        (_form(GOOD, dataset=_zip({"cat.png": TWO[0], "cat.txt": b"\xff\xfe\xfa"})), 400, "dataset:cat.txt", "invalid_caption"),
        (_form(GOOD, dataset=_zip({"cat.gif": b"GIF89a"})), 415, "dataset:cat.gif", "unsupported_image_format"),
        (_form(GOOD, dataset=_zip({f"{i}.txt": b"x" for i in range(109)})), 400, "dataset", "too_many_files"),
        (_form(GOOD, dataset=_zip({"big.png": b"\x00" * (3 * 1024 * 1024), "big.txt": b"x"})), 413, "dataset", "zip_too_large"),
        (_form(GOOD, dataset=_lying_zip()), 400, "dataset:bomb.png", "invalid_zip"),
        (_form(GOOD, dataset=_zip({"a.png": TWO[0], "a.txt": b"x"}, zipfile.ZIP_BZIP2)), 400, "dataset:a.txt", "invalid_zip"),
        (_form(GOOD, dataset=_zip({"a.png": b"\x00" * 100, "a.txt": b"x"})), 400, "dataset:a.png", "invalid_image"),
    ],
)
async def test_bad_forms_are_4xx_naming_the_field(tmp_path, form, status, param, code):
    async with local_app(FakeEngine(), tmp_path, **ARGS) as client:
        error = _error(await client.post("/v1/loras/train", **form), status)
        assert (error["param"], error["code"]) == (param, code), error
        assert (await client.get("/v1/jobs")).json()["data"] == []  # nothing was queued


async def test_form_shapes_that_are_refused(tmp_path):
    async with local_app(FakeEngine(), tmp_path, **ARGS) as client:
        error = _error(await client.post("/v1/loras/train", json={"name": "ink"}), 415)
        assert error["code"] == "unsupported_content_type"
        duplicate = {"data": {"name": "ink", "rank": ["4", "8"], "captions": ["a"]}, "files": [("images", ("a.png", TWO[0]))]}
        error = _error(await client.post("/v1/loras/train", **duplicate), 400)
        assert (error["param"], error["code"]) == ("rank", "duplicate_field")
        as_text = {"data": {"name": "ink", "images": "a.png", "captions": "a"}, "files": [("dataset", ("x.bin", b"x"))]}
        error = _error(await client.post("/v1/loras/train", **as_text), 400)
        assert (error["param"], error["code"]) == ("images.0", "invalid_image")
        as_file = {"data": {"name": "ink", "captions": "a"}, "files": [("images", ("a.png", TWO[0])), ("rank", ("r", b"8"))]}
        error = _error(await client.post("/v1/loras/train", **as_file), 400)
        assert (error["param"], error["code"]) == ("rank", "invalid_value")


async def test_the_body_is_limited_to_training_max_upload_bytes(tmp_path):
    big = _encode(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8))  # ~3 MB
    async with local_app(FakeEngine(), tmp_path, **ARGS) as client:
        error = _error(await client.post("/v1/loras/train", **_form(GOOD, [big], ["a"])), 413)
        assert error["code"] == "body_too_large"


@pytest.mark.parametrize("args", [{"training": {"enabled": False}}, {"limits": {"max_loras": 0}}])
async def test_training_disabled_is_404(tmp_path, args):
    async with local_app(FakeEngine(), tmp_path, **args) as client:
        error = _error(await client.post("/v1/loras/train", **_form(GOOD, TWO, ["a", "b"])), 404)
        assert error["code"] == "training_disabled"
        assert "/v1/loras/train" not in (await client.get("/openapi.json")).json()["paths"]


async def test_the_schema_states_this_deployments_training_limits(tmp_path):
    async with local_app(FakeEngine(), tmp_path, **ARGS) as client:
        schema = (await client.get("/openapi.json")).json()
    form = schema["paths"]["/v1/loras/train"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    properties = form["properties"]
    assert properties["rank"]["maximum"] == 32 and properties["steps"]["maximum"] == 100
    assert properties["images"]["maxItems"] == 4 and properties["images"]["items"]["format"] == "binary"
    assert properties["dataset"]["format"] == "binary" and form["required"] == ["name"]
    # the denoising `steps` elsewhere keep their own limit
    assert schema["components"]["schemas"]["RefinerSettings"]["properties"]["steps"]["anyOf"][0]["maximum"] == 150
