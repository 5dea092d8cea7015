"""The HTTP app in-process over a fake engine (no Ray, no model): routes, validation, the error
envelope, limits on uploads, overload and lost replicas, Server-Timing, the docs pages."""

import asyncio
import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from tests.fakes import FakeEngine, local_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _picture(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape): a valid
    IHDR, one short IDAT, IEND. Decoding it would need width * height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


def _error(response) -> dict:
    assert "Traceback" not in response.text
    return response.json()["error"]


# --- invalid input is a 4xx naming the field, never a 500 ------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/img2img", {"num_inference_steps": 1}),  # 1 × 0.75: diffusers would run no step
        ("/v1/img2img", {"num_inference_steps": 4, "strength": 0.2}),
        ("/v1/inpaint", {"num_inference_steps": 2, "strength": 0.4}),
    ],
)
async def test_fewer_than_one_denoising_step_runs_one(tmp_path, path, body):
    """steps × strength < 1 made diffusers fail (a 500, and a job retried then failed): such a
    request now runs the last step, as documented, over HTTP and as a job."""
    engine = FakeEngine()
    async with local_app(engine, tmp_path) as client:
        payload = {"prompt": "x", "image": _b64(_png(_picture())), **body}
        if path == "/v1/inpaint":
            payload["mask"] = _b64(_png(Image.new("L", (64, 64), 255)))
        response = await client.post(path, json=payload)
        assert response.status_code == 200, response.text
        job = await client.post("/v1/jobs", json={"kind": path.removeprefix("/v1/"), "params": payload})
        assert job.status_code == 202, job.text
        assert job.json()["progress"]["total"] == 1
    assert engine.requests[0].denoising_steps() == 1


async def test_edits_with_one_step_at_default_strength_runs(tmp_path):
    async with local_app(FakeEngine(), tmp_path) as client:
        response = await client.post(
            "/v1/images/edits",
            data={"prompt": "x", "num_inference_steps": "1"},
            files={"image": ("i.png", _png(_picture()), "image/png")},
        )
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("width, height", [(20000, 20000), (8000, 8000)])
@pytest.mark.parametrize("field", ["image", "mask"])
async def test_huge_declared_pixel_counts_are_refused_before_decoding(tmp_path, width, height, field):
    """A 20000² PNG (a decompression bomb) and an 8000² one are refused from their header: 413
    naming the field, on every upload path, and the engine never sees them."""
    bomb = _declared_png(width, height)
    assert len(bomb) < 2000
    engine = FakeEngine()
    parts = {"image": _png(_picture()), "mask": _png(Image.new("L", (64, 64), 255)), field: bomb}
    async with local_app(engine, tmp_path) as client:
        started = time.perf_counter()
        inpaint = await client.post("/v1/inpaint", json={"prompt": "x", **{k: _b64(v) for k, v in parts.items()}})
        edits = await client.post(
            "/v1/images/edits", data={"prompt": "x"}, files={k: (f"{k}.png", v, "image/png") for k, v in parts.items()}
        )
        responses = [inpaint, edits]
        if field == "image":
            responses.append(await client.post("/v1/img2img", json={"prompt": "x", "image": _b64(bomb)}))
        elapsed = time.perf_counter() - started
    for response in responses:
        assert response.status_code == 413, response.text
        assert _error(response)["param"] == field and _error(response)["code"] == "image_too_large"
    assert engine.requests == [] and elapsed < 5


async def test_a_large_upload_within_the_pixel_limit_is_scaled_to_fit_max_pixels(tmp_path):
    engine = FakeEngine()
    async with local_app(engine, tmp_path, limits={"max_pixels": 128 * 128}) as client:
        response = await client.post("/v1/img2img", json={"prompt": "x", "image": _b64(_png(_picture((512, 256))))})
    assert response.status_code == 200, response.text
    (request,) = engine.requests
    assert (request.width, request.height) == (176, 88) and request.init_image.shape == (88, 176, 3)


@pytest.mark.parametrize("path", ["/v1/txt2img", "/v1/images/generations", "/v1/img2img", "/v1/inpaint", "/v1/jobs", "/v1/images/batch"])
async def test_deeply_nested_json_is_400(tmp_path, path):
    deep = b"[" * 100_000 + b"]" * 100_000
    async with local_app(FakeEngine(), tmp_path) as client:
        response = await client.post(path, content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert _error(response)["code"] == "invalid_json"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("path", ["/v1/txt2img", "/v1/images/generations"])
async def test_lone_surrogates_are_400(tmp_path, path, field):
    body = b'{"prompt": "x", "%s": "a \\ud800 b"}' % field.encode() if field != "prompt" else b'{"prompt": "a \\ud800"}'
    async with local_app(FakeEngine(), tmp_path) as client:
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert _error(response)["param"] == field


async def test_lone_surrogates_in_a_job_are_400(tmp_path):
    body = b'{"kind": "txt2img", "params": {"prompt": "x", "negative_prompt": "\\udfff"}}'
    async with local_app(FakeEngine(), tmp_path) as client:
        response = await client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and _error(response)["param"] == "params.negative_prompt"


# --- overload, lost replicas ------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure, code",
    [
        (BackPressureError(num_queued_requests=64, max_queued_requests=64), "overloaded"),
        (ActorDiedError(), "engine_unavailable"),
    ],
)
async def test_a_full_engine_queue_or_a_lost_replica_is_503_with_retry_after(tmp_path, failure, code):
    engine = FakeEngine()
    async with local_app(engine, tmp_path) as client:
        engine.failures = [failure]
        response = await client.post("/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64})
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"].isdigit()
        assert _error(response)["code"] == code and _error(response)["type"] == "overloaded_error"
        # the next request is served
        assert (await client.post("/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64})).status_code == 200


async def test_server_timing_adds_up_to_the_time_in_the_ingress(tmp_path):
    """Under load most of a request's time is waiting for the engine: `queue` must show it, and
    the parts must add up to `total`, which is what the client waited (minus the transport)."""
    engine = FakeEngine(delay_s=0.2, capacity=1)
    async with local_app(engine, tmp_path) as client:

        async def one(seed: int):
            started = time.perf_counter()
            response = await client.post("/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "seed": seed})
            return response, time.perf_counter() - started

        answers = await asyncio.gather(*(one(seed) for seed in range(4)))
    for response, waited_s in answers:
        assert response.status_code == 200
        parts = {name: float(ms) / 1e3 for name, ms in (p.split(";dur=") for p in response.headers["server-timing"].split(", "))}
        assert set(parts) == {"decode", "queue", "run", "encode", "total"}
        assert parts["total"] <= waited_s
        assert abs(sum(parts[name] for name in ("decode", "queue", "run", "encode")) - parts["total"]) < 0.05
        assert parts["total"] > 0.8 * waited_s
    slowest = max(answers, key=lambda answer: answer[1])[0]
    assert float(slowest.headers["server-timing"].split("queue;dur=")[1].split(",")[0]) > 500  # waited ~3 runs


# --- protocol details -------------------------------------------------------------------------


@pytest.mark.parametrize("path, allowed", [("/v1/jobs", "GET, POST"), ("/v1/jobs/job-x", "DELETE, GET"), ("/v1/txt2img", "POST")])
async def test_405_lists_every_method_of_the_path(tmp_path, path, allowed):
    async with local_app(FakeEngine(), tmp_path) as client:
        response = await client.request("PUT", path)
    assert response.status_code == 405 and response.headers["allow"] == allowed
    assert set(_error(response)) == {"message", "type", "param", "code"}


async def test_docs_pages_load_nothing_from_the_internet(tmp_path):
    async with local_app(FakeEngine(), tmp_path) as client:
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            assert "cdn." not in html and "https://" not in html, page
            for asset in (part.split('"')[0] for part in html.split('src="')[1:]):
                served = await client.get(asset)
                assert served.status_code == 200 and len(served.content) > 100_000, asset


async def test_webhook_url_with_credentials_is_refused(tmp_path):
    body = {"kind": "txt2img", "params": {"prompt": "x"}, "webhook_url": "http://user:secret@hooks.example/cb"}
    async with local_app(FakeEngine(), tmp_path) as client:
        response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 400 and _error(response)["param"] == "webhook_url"
    assert "secret" not in response.text


async def test_body_over_the_limit_is_413_on_json_routes(tmp_path):
    huge = b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    async with local_app(FakeEngine(), tmp_path, limits={"max_upload_bytes": 256 * 1024}) as client:
        for path in ("/v1/txt2img", "/v1/jobs", "/v1/img2img"):
            response = await client.post(path, content=huge, headers={"content-type": "application/json"})
            assert response.status_code == 413, (path, response.text)
            assert set(_error(response)) == {"message", "type", "param", "code"}

            async def chunks():  # no content-length: counted as it arrives
                for start in range(0, len(huge), 64 * 1024):
                    yield huge[start : start + 64 * 1024]

            response = await client.post(path, content=chunks(), headers={"content-type": "application/json"})
            assert response.status_code == 413, (path, response.text)
            assert _error(response)["type"] == "invalid_request_error"


def test_the_fake_engine_has_the_replica_api():
    """Routes tested against `FakeEngine` call what the real engine deployment has."""
    from deployments.replica import EngineReplica

    fake = {name for name in dir(FakeEngine) if not name.startswith("_")} - {"delay_s", "failures", "requests"}
    assert fake <= {name for name in dir(EngineReplica) if not name.startswith("_")}
