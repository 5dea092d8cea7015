"""`deep_cache_interval` at the doors, in-process over the tiny engine (no Ray): it reaches the
engine through the native call, the OpenAI extra and a job (each the same image, unlike the
uncached one); out-of-range values and the combinations it cannot serve are 400s naming the
field; a job payload keeps it (an engine without deep-cache passes refuses it by code:
tests/test_deep_cache.py)."""

import base64
import json

import numpy as np
import pytest

from configs.model_spec import TinySpec
from deployments.types import GenerationRequest
from serve_app.jobs.payload import JobPayload
from tests.fakes import decoded_rgb, finished_job, txt2img_rgb

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
    assert JobPayload.from_json(older).requests[0].deep_cache_interval == 1

