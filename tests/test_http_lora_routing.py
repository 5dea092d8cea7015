"""`loras.routing`, in-process over a fake engine and a real job manager (no Ray): with
`multiplexed` (the default) a request with LoRAs reaches its engine through a handle carrying its
set's `multiplexed_model_id`, so Ray's router prefers a replica holding the set; with `any` no
handle carries one (Ray's default routing, which `benchmarks/bench_scaleout.py` compares against).
That the hint steers requests on a cluster is `tests/integration/test_lora_routing.py`'s."""

import asyncio

import pytest

from deployments.types import LoraRef, lora_set_id
from tests import fakes
from tests.fakes import FakeEngine, local_app

pytestmark = pytest.mark.anyio

PASTEL = [{"name": "pastel", "weight": 0.5}]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def asked(monkeypatch) -> list[dict]:
    """Every `handle.options(...)` call's keywords, from the ingress and the job manager alike."""
    calls: list[dict] = []
    options = fakes.LocalHandle.options

    def recording(self, stream: bool = False, **kwargs):
        calls.append(kwargs)
        return options(self, stream, **kwargs)

    monkeypatch.setattr(fakes.LocalHandle, "options", recording)
    return calls


async def _generate_and_run_a_job(client) -> None:
    body = {"prompt": "a red circle", "num_inference_steps": 2, "loras": PASTEL}
    response = await client.post("/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    job = (await client.post("/v1/jobs", json={"kind": "txt2img", "params": body})).json()
    for _ in range(200):
        view = (await client.get(f"/v1/jobs/{job['id']}")).json()
        if view["status"] not in ("queued", "running"):
            break
        await asyncio.sleep(0.02)
    assert view["status"] == "succeeded", view


async def test_multiplexed_routing_names_the_lora_set(tmp_path, asked):
    async with local_app(FakeEngine(), tmp_path) as client:
        await _generate_and_run_a_job(client)
    set_id = lora_set_id((LoraRef(name="pastel", weight=0.5),))
    # The synchronous request and the job's image both asked for a replica holding the set.
    assert [call.get("multiplexed_model_id") for call in asked if "multiplexed_model_id" in call] == [set_id, set_id]


async def test_any_routing_sets_no_multiplexed_model_id(tmp_path, asked):
    async with local_app(FakeEngine(), tmp_path, loras={"routing": "any"}) as client:
        await _generate_and_run_a_job(client)
    assert not [call for call in asked if "multiplexed_model_id" in call], asked
