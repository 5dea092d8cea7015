"""The refiner over HTTP, in-process against fake engines: which doors take `refiner`, that a
refined request passes through both stages (the base's latents handed to the refiner), that a
plain one never reaches the refiner, progress over both stages, and the 4xx answers."""

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image

from deployments.types import OverloadedError
from tests.fakes import FakeEngine, local_app

pytestmark = pytest.mark.anyio

#: The fake base hands off flat latents of the seed's colour; the fake refiner inverts it.
SEED = 40


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _colour(response) -> int:
    with Image.open(io.BytesIO(response.content)) as image:
        return int(np.asarray(image)[0, 0, 0])


def _png(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_a_refined_request_passes_through_both_stages_and_a_plain_one_only_the_base(tmp_path):
    base, refiner = FakeEngine(), FakeEngine()
    async with local_app(base, tmp_path, roles={"refiner": refiner}) as client:
        body = {"prompt": "a red circle", "seed": SEED, "num_inference_steps": 10}
        refined = await client.post("/v1/txt2img", json={**body, "refiner": {"mode": "ensemble", "switch_at": 0.7}})
        assert refined.status_code == 200, refined.text
        assert _colour(refined) == 255 - SEED  # the refiner's image, made from the base's latents
        plain = await client.post("/v1/txt2img", json=body)
        assert plain.status_code == 200 and _colour(plain) == SEED
    (stage_one, _) = base.requests
    (stage_two,) = refiner.requests  # the plain request never reached the refiner
    assert stage_one.refiner.switch_at == 0.7 and stage_one.handoff is None
    assert stage_two.handoff.request_id == stage_one.request_id and stage_two.handoff.latents.shape == (4, 16, 16)  # 128² at 1/8


@pytest.mark.parametrize(
    "path, extra",
    [
        ("/v1/images/generations", {"size": "64x64", "response_format": "b64_json"}),
        ("/v1/img2img", {"image": base64.b64encode(_png()).decode()}),
    ],
)
async def test_the_openai_door_and_img2img_take_the_field(tmp_path, path, extra):
    refiner = FakeEngine()
    async with local_app(FakeEngine(), tmp_path, roles={"refiner": refiner}) as client:
        response = await client.post(path, json={"prompt": "x", "seed": SEED, "refiner": {"mode": "post"}, **extra})
        assert response.status_code == 200, response.text
    assert refiner.requests[0].refiner.strength == 0.3  # post's default, resolved in one place


async def test_img2img_multipart_takes_the_refiner_as_a_json_part(tmp_path):
    refiner = FakeEngine()
    async with local_app(FakeEngine(), tmp_path, roles={"refiner": refiner}) as client:
        response = await client.post(
            "/v1/img2img",
            data={"prompt": "x", "refiner": '{"mode": "ensemble", "steps": 12}'},
            files={"image": ("i.png", _png(), "image/png")},
        )
        assert response.status_code == 200, response.text
    assert refiner.requests[0].refiner.steps == 12


async def test_a_refined_job_counts_progress_over_both_stages(tmp_path):
    base, refiner = FakeEngine(), FakeEngine()
    async with local_app(base, tmp_path, roles={"refiner": refiner}) as client:
        body = {"prompt": "x", "seed": SEED, "num_inference_steps": 10, "refiner": {"switch_at": 0.6}}
        view = (await client.post("/v1/jobs", json={"kind": "txt2img", "params": body})).json()
        assert view["progress"]["total"] == 6 + 4  # the base to the switch, the refiner after it
        for _ in range(200):
            job = (await client.get(f"/v1/jobs/{view['id']}")).json()
            if job["status"] == "succeeded":
                break
            await asyncio.sleep(0.02)
        assert job["status"] == "succeeded" and job["progress"]["percent"] == 100.0
        assert _colour(await client.get(f"/v1/jobs/{view['id']}/result")) == 255 - SEED
    assert refiner.requests[0].handoff is not None


@pytest.mark.parametrize(
    "args, path, body, status, param, code",
    [
        ({"refiner": False}, "/v1/txt2img", {"refiner": {}}, 400, "refiner", "refiner_not_served"),
        ({}, "/v1/txt2img", {"refiner": {"mode": "post", "switch_at": 0.5}}, 400, "refiner", None),
        ({}, "/v1/txt2img", {"refiner": {"mode": "fast"}}, 400, "refiner.mode", None),
        ({}, "/v1/txt2img", {"refiner": {"switch_at": 1}}, 400, "refiner.switch_at", None),
        ({}, "/v1/txt2img", {"refiner": {"mode": "post", "strength": 0.1, "steps": 5}}, 400, "refiner.strength", "invalid_value"),
        ({}, "/v1/txt2img", {"refiner": {"steps": 151}}, 400, "refiner.steps", "invalid_steps"),  # limits.max_steps
        ({}, "/v1/inpaint", {"refiner": {}}, 400, "refiner", None),  # not a field of inpainting
    ],
)
async def test_mistakes_are_400s_naming_the_field(tmp_path, args, path, body, status, param, code):
    base = FakeEngine()
    async with local_app(base, tmp_path, **args) as client:
        payload = {"prompt": "x", **body}
        if path == "/v1/inpaint":
            payload.update(image=base64.b64encode(_png()).decode(), mask=base64.b64encode(_png()).decode())
        response = await client.post(path, json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and (code is None or error["code"] == code), error
    assert not base.requests  # refused before any engine work


async def test_a_failing_refiner_is_a_clean_503_not_a_hang(tmp_path):
    refiner = FakeEngine()
    refiner.failures = [OverloadedError("the engine replica was lost", code="engine_unavailable")]
    async with local_app(FakeEngine(), tmp_path, roles={"refiner": refiner}) as client:
        response = await client.post("/v1/txt2img", json={"prompt": "x", "refiner": {}})
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
    assert "retry-after" in response.headers
