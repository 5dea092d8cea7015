"""What only a real cluster shows: the app behind Ray's HTTP proxy, the engine in its own replica
process, requests from separate connections joining one running batch."""

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.app_config import MAX_BATCH

pytestmark = pytest.mark.integration


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_txt2img_through_the_proxy(http):
    response = http.post("/v1/txt2img", json={"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 3})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "3" and int(response.headers["x-batch-size"]) >= 1
    assert "total;dur=" in response.headers["server-timing"]
    assert http.get("/healthz").json()["model"]["scheduling"] == "step"


def test_requests_on_separate_connections_share_forwards(served, http, engine):
    bodies = [
        {"prompt": f"shape {i}", "seed": 500 + i, "width": 64, "height": 64, "num_inference_steps": 3,
         "scheduler": "Euler a" if i % 2 else "DDIM", "guidance_scale": 1.0 if i % 3 == 0 else 5.0}
        for i in range(MAX_BATCH)
    ]
    sequential = [_pixels(http.post("/v1/txt2img", json=body).content) for body in bodies]

    async def post_all():
        async with httpx.AsyncClient(base_url=served.base_url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/txt2img", json=body) for body in bodies))

    before = engine.stats.remote().result()
    responses = asyncio.run(post_all())
    after = engine.stats.remote().result()
    assert all(r.status_code == 200 for r in responses)
    shared = after["rows_per_forward"][len(before["rows_per_forward"]) :]
    assert max(shared) > 1 and max(shared) <= MAX_BATCH
    for alone, response in zip(sequential, responses):
        assert np.abs(_pixels(response.content) - alone).max() <= 1


def test_a_short_request_sent_while_a_long_one_runs_finishes_first(served):
    """The default config schedules per step: the short request joins the running batch and
    leaves it when its own steps are done, long before the long request's."""
    finished = {}

    def post(name: str, steps: int) -> None:
        body = {"prompt": name, "width": 128, "height": 128, "num_inference_steps": steps, "seed": 1}
        response = httpx.post(f"{served.base_url}/v1/txt2img", json=body, timeout=120)
        finished[name] = (time.perf_counter(), response.status_code)

    long = threading.Thread(target=post, args=("long", 150))
    long.start()
    time.sleep(1.0)  # the long request is denoising
    sent = time.perf_counter()
    post("short", 4)
    long.join(120)
    assert finished["short"][1] == finished["long"][1] == 200
    assert finished["short"][0] < finished["long"][0]
    assert finished["short"][0] - sent < finished["long"][0] - sent


def test_the_openai_client_against_the_server(served):
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)
    result = client.images.generate(prompt="a tree", size="64x64", n=2, extra_body={"seed": 5, "num_inference_steps": 2})
    assert [item.model_extra["seed"] for item in result.data] == [5, 6]
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 64)


def test_job_events_stream_through_the_proxy(served, http):
    body = {"kind": "txt2img", "params": {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 20}}
    view = http.post("/v1/jobs", json=body).json()
    events = []
    with httpx.stream("GET", f"{served.base_url}/v1/jobs/{view['id']}/events", timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert events[-1]["status"] == "succeeded" and events[-1]["progress"]["percent"] == 100.0
