"""Schemathesis against the served OpenAPI schema: every request the schema calls valid is
accepted, no request gets a 5xx, and every answer's status and body are the ones the schema lists.

The app runs in-process (uvicorn in a thread) over the fake engine, with small limits so images
stay tiny; uploads are drawn as real PNGs (64x64, with a transparent square, so they also serve as
OpenAI edit masks) since the schema can say "an image" but not "a decodable one".
"""

import asyncio
import base64
import io
import threading

import numpy as np
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import (
    not_a_server_error,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from configs.app_args import AppArgs
from configs.schedulers import DISTILLED_SCHEDULE_STEPS, canonical_scheduler
from serve_app.http_app import create_app
from serve_app.jobs.manager import JobManager
from tests.fakes import FakeEngine, LocalHandle, engine_registry
from tests.app_config import free_port

LIMITS = {"max_pixels": 128 * 128, "max_steps": 6, "max_n": 2, "max_prompt_chars": 200}
JOBS = {"max_batch_items": 3, "webhook_attempts": 1, "webhook_timeout_s": 0.5}
EXAMPLES = 120  # per operation and method: 21 operations, over 2,000 requests in about 20 s
#: Requests sent per operation (`test_the_fuzz_sent_at_least_2000_requests` reads it).
SENT: dict[str, int] = {}


def _upload(seed: int) -> bytes:
    rgba = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[16:48, 16:48, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG")
    return buffer.getvalue()


_UPLOADS = [_upload(seed) for seed in range(3)]
schemathesis.openapi.format("binary", st.sampled_from(_UPLOADS))
schemathesis.openapi.format("byte", st.sampled_from([base64.b64encode(data).decode() for data in _UPLOADS]))


#: The served model's default steps (the refiner's post-pass counts from it), size and guidance
#: scale (`guidance_end` needs guidance).
DEFAULT_STEPS = 4
DEFAULT_SIZE = (64, 64)
DEFAULT_GUIDANCE_SCALE = 5.0


def _config(state_dir) -> AppArgs:
    model = {"source": "tiny", "default_steps": DEFAULT_STEPS, "default_size": list(DEFAULT_SIZE)}
    return AppArgs.model_validate(
        {"state_dir": str(state_dir), "model": model, "limits": LIMITS, "jobs": JOBS}
    ).with_state_paths()


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    """The app on a real socket in its own event loop thread (the job manager's loops live there)."""
    config = _config(tmp_path_factory.mktemp("state"))
    port = free_port()
    loop = asyncio.new_event_loop()
    server: dict = {}
    ready = threading.Event()

    async def main():
        engines = engine_registry(config, lambda role: FakeEngine())
        manager = JobManager.__new__(JobManager)
        await manager.__init__(engines, config.jobs.model_dump(), config.controlnet_roles())
        app = create_app(engines, LocalHandle(manager), config)
        server["uvicorn"] = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        ready.set()
        await server["uvicorn"].serve()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(30)
    while not server["uvicorn"].started:
        threading.Event().wait(0.05)
    yield f"http://127.0.0.1:{port}"
    server["uvicorn"].should_exit = True
    thread.join(10)


def _schema() -> dict:
    """The schema the server serves, built the same way without starting it (no handle is called
    to build it): its operations parametrize the test."""
    config = _config("/nonexistent")
    app = create_app(engine_registry(config, lambda role: FakeEngine()), LocalHandle(None), config)
    return app.openapi()


SCHEMA = schemathesis.openapi.from_dict(_schema())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


#: A schema can say "a file" but not "a LoRA for this model", nor "a ZIP of captioned images",
#: nor rules across parts (as many captions as images, `batch_size` at most their number, each
#: image at least half the `resolution`): such bodies are refused (400 naming why), so only the
#: other checks apply there.
NO_POSITIVE_DATA = {"POST /v1/loras", "POST /v1/loras/train"}


def _unstatable(case) -> bool:
    """Bodies breaking a rule JSON Schema cannot state: a ControlNet window must open before it
    closes (`guidance_start < guidance_end`, a comparison of two fields), a request names each
    ControlNet once and only ControlNets hosted together (here each is a variant of its own, so
    one name; a rule across items), a refiner post-pass runs at least one step (a product of
    fields and a model default), as does a hires pass (`_hires_refused`), and `guidance_end` below
    1 needs guidance (`guidance_scale` > 1, or the model's default) and no refiner, a
    `deep_cache_interval` above 1 neither a refiner nor a ControlNet, and LCM and TCD take no
    `timestep_spacing`; such bodies get a 400."""
    body = case.body if isinstance(case.body, dict) else {}
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    items = [body, params, *(r.get("params", r) for r in body.get("requests", []) if isinstance(r, dict))]
    for item in items:
        refiner = item.get("refiner")
        if isinstance(refiner, dict) and refiner.get("mode") == "post":
            steps = refiner.get("steps") or item.get("num_inference_steps") or params.get("num_inference_steps") or DEFAULT_STEPS
            if int(steps * (refiner.get("strength") or 0.3)) < 1:
                return True
        if isinstance(item.get("hires"), dict) and _hires_refused(item, params):
            return True
        if item.get("guidance_end", 1.0) < 1.0:
            scale = item.get("guidance_scale")
            if item.get("refiner") is not None or (scale if scale is not None else DEFAULT_GUIDANCE_SCALE) <= 1.0:
                return True
        if (item.get("deep_cache_interval") or 1) > 1 and (item.get("refiner") is not None or item.get("controlnet")):
            return True
        if _distilled(item.get("scheduler") or params.get("scheduler")) and (
            item.get("timestep_spacing") or params.get("timestep_spacing")
        ):
            return True
        controls = item.get("controlnet")
        controls = controls if isinstance(controls, list) else [controls]
        names = [control.get("name") for control in controls if isinstance(control, dict)]
        if len(names) > 1:
            return True
        for control in controls:
            if isinstance(control, dict) and control.get("guidance_start", 0.0) >= control.get("guidance_end", 1.0):
                return True
    return False


def _distilled(scheduler) -> bool:
    """LCM or TCD (by id or name): they refuse a `timestep_spacing`."""
    return isinstance(scheduler, str) and canonical_scheduler(scheduler) in DISTILLED_SCHEDULE_STEPS


def _hires_refused(item: dict, params: dict) -> bool:
    """The hires rules across fields: not with the refiner, width with height and not with scale
    (given as values), its size at least the first pass's and within `max_pixels`, at least one
    step."""
    hires = item["hires"]
    if item.get("refiner") is not None or params.get("refiner") is not None:
        return True
    # The schema says which keys go together; a null among them counts as absent to the server.
    if (hires.get("width") is None) != (hires.get("height") is None) or None not in (hires.get("scale"), hires.get("width")):
        return True
    width, height = DEFAULT_SIZE
    size = item.get("size")
    if isinstance(size, str) and "x" in size:
        width, height = (int(side) for side in size.split("x"))
    width, height = item.get("width") or params.get("width") or width, item.get("height") or params.get("height") or height
    if hires.get("width") is not None:
        target = hires["width"], hires["height"]
    else:
        scale = hires.get("scale") or 2.0
        target = max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)
    steps = hires.get("steps") or item.get("num_inference_steps") or params.get("num_inference_steps") or DEFAULT_STEPS
    return (
        target[0] < width or target[1] < height or target[0] * target[1] > LIMITS["max_pixels"]
        or int(steps * (hires.get("strength") or 0.4)) < 1
    )


@pytest.mark.parametrize("operation", OPERATIONS, ids=[operation.label for operation in OPERATIONS])
def test_the_server_does_what_its_schema_says(api_url, operation):
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    if operation.label not in NO_POSITIVE_DATA:
        checks.append(positive_data_acceptance)

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def run(case):
        assume(not _unstatable(case))
        SENT[operation.label] = SENT.get(operation.label, 0) + 1
        case.call_and_validate(base_url=api_url, checks=checks)

    run()


def test_the_fuzz_sent_at_least_2000_requests():
    """The run above is the bounded fuzz of issue #19: at least 2,000 generated requests in all
    (operations without parameters take one case each, so the others carry the count)."""
    assert sum(SENT.values()) >= 2000, SENT
