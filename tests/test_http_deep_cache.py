"""`deep_cache_interval` at the doors, in-process over the tiny engine (no Ray): it reaches the
engine through the native call, the OpenAI extra and a job (each the same image, unlike the
uncached one); out-of-range values and the combinations it cannot serve are 400s naming the
field; a job payload keeps it (an engine without deep-cache passes refuses it by code:
tests/test_deep_cache.py). A deployment's `model.default_deep_cache_interval` is what requests
without one get, at every door (over a fake engine that records them), except where deep caching
cannot serve them."""

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from configs.app_args import LimitsConfig
from configs.model_spec import TinySpec
from deployments.engine.factory import EngineFactory
from deployments.replica import EngineReplica
from deployments.types import GenerationRequest
from serve_app.jobs.payload import JobPayload
from tests.fakes import FakeEngine, decoded_rgb, finished_job, local_app, txt2img_rgb

SPEC = TinySpec(device="cpu")
SMALL = {"width": 64, "height": 64, "num_inference_steps": 6, "seed": 3}


def _txt2img(http, **fields) -> np.ndarray:
    return txt2img_rgb(http, {"prompt": "a red star", **SMALL, **fields})


def test_the_interval_reaches_the_engine_through_every_door(http):
    cached = _txt2img(http, deep_cache_interval=3)
    assert not np.array_equal(cached, _txt2img(http))

    generated = http.post(
        "/v1/images/generations",
        json={"prompt": "a red star", "size": "64x64", "num_inference_steps": 6, "seed": 3, "deep_cache_interval": 3},
    )
    assert generated.status_code == 200, generated.text
    assert np.array_equal(decoded_rgb(base64.b64decode(generated.json()["data"][0]["b64_json"])), cached)

    job = http.post("/v1/jobs", json={"kind": "txt2img", "params": {"prompt": "a red star", **SMALL, "deep_cache_interval": 3}})
    assert job.status_code == 202, job.text
    view = finished_job(http, job.json()["id"])
    assert view["status"] == "succeeded", view
    assert np.array_equal(decoded_rgb(http.get(f"/v1/jobs/{view['id']}/result").content), cached)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/txt2img", {"prompt": "x", "deep_cache_interval": 11}, "deep_cache_interval"),
        ("/v1/txt2img", {"prompt": "x", "deep_cache_interval": 0}, "deep_cache_interval"),
        ("/v1/images/generations", {"prompt": "x", "deep_cache_interval": "often"}, "deep_cache_interval"),
        ("/v1/jobs", {"kind": "txt2img", "params": {"prompt": "x", "deep_cache_interval": 11}}, "params.deep_cache_interval"),
        ("/v1/txt2img", {"prompt": "x", "deep_cache_interval": 2, "refiner": {"mode": "ensemble"}}, "deep_cache_interval"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(http, path, body, param):
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_a_job_payload_keeps_the_interval():
    request = GenerationRequest(prompt="p", deep_cache_interval=4, **SMALL).with_defaults(SPEC)
    stored = json.loads(json.dumps(JobPayload([request]).to_json()))
    assert JobPayload.from_json(stored).requests[0].deep_cache_interval == 4
    older = {**stored, "version": 6, "requests": [{k: v for k, v in stored["requests"][0].items() if k != "deep_cache_interval"}]}
    # Stored before intervals existed: every step whole, whatever default the deployment has now.
    assert JobPayload.from_json(older).requests[0].deep_cache_interval == 1


# -- a deployment's default interval ---------------------------------------------------------------

CACHING_BY_DEFAULT = {"model": {"source": "tiny", "device": "cpu", "default_deep_cache_interval": 3, "optimize": {"deep_cache": True}}}


def _png_b64(side: int = 64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_requests_without_an_interval_get_the_deployments_default(tmp_path, anyio_backend):
    base, controlled = FakeEngine(), FakeEngine()
    async with local_app(base, tmp_path, roles={"controlnet:canny": controlled}, **CACHING_BY_DEFAULT) as client:
        bodies = [
            ("/v1/txt2img", {"prompt": "x"}),
            ("/v1/images/generations", {"prompt": "x", "size": "64x64"}),
            ("/v1/txt2img", {"prompt": "x", "deep_cache_interval": 1}),  # a client opting out
            ("/v1/txt2img", {"prompt": "x", "deep_cache_interval": 5}),
            ("/v1/txt2img", {"prompt": "x", "refiner": {"mode": "ensemble"}}),  # deep caching cannot serve these
        ]
        for path, body in bodies:
            response = await client.post(path, json=body)
            assert response.status_code == 200, (body, response.text)
        job = await client.post("/v1/jobs", json={"kind": "txt2img", "params": {"prompt": "x"}})
        assert job.status_code == 202, job.text
        for _ in range(200):
            if len(base.requests) == len(bodies) + 1:
                break
            await asyncio.sleep(0.02)
        steered = await client.post("/v1/txt2img", json={"prompt": "x", "controlnet": {"name": "canny", "image": _png_b64()}})
        assert steered.status_code == 200, steered.text
    assert [request.deep_cache_interval for request in base.requests] == [3, 3, 1, 5, 1, 3]
    assert [request.deep_cache_interval for request in controlled.requests] == [1]


def test_a_default_interval_needs_the_deep_cache_passes():
    with pytest.raises(ValueError, match="default_deep_cache_interval 3 needs optimize.deep_cache"):
        TinySpec(default_deep_cache_interval=3)
    for value in (0, 11):
        with pytest.raises(ValueError, match="default_deep_cache_interval"):
            TinySpec(default_deep_cache_interval=value, optimize={"deep_cache": True})


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_handle_callers_request_gets_the_replicas_default(anyio_backend):
    """Through the engine deployment's own door (what a `DeploymentHandle` calls), on the tiny
    engine: no interval means the replica's default, the same image as asking for it."""
    model = {**CACHING_BY_DEFAULT["model"], "name": "sdxl-tiny"}
    replica = EngineReplica(model, LimitsConfig().model_dump(), EngineFactory(model, {"max_batch_size": 4}))
    try:
        assert replica.model_info()["default_deep_cache_interval"] == 3

        async def image(**fields):
            request = GenerationRequest(prompt="a red star", **SMALL, **fields)
            return (await replica.generate(request)).image

        by_default = await image()
        assert np.array_equal(by_default, await image(deep_cache_interval=3))
        assert not np.array_equal(by_default, await image(deep_cache_interval=1))
    finally:
        replica.close()
