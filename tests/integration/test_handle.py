"""Python callers: another Ray app calling the base deployment through a DeploymentHandle."""

import time

import numpy as np
import pytest
from ray.serve.exceptions import RequestCancelledError as ServeRequestCancelledError

from deployments.types import GenerationRequest, GenerationResult, InvalidRequestError, RequestCancelledError

pytestmark = pytest.mark.integration


def test_generate_through_a_handle(engine):
    result = engine.generate.remote(GenerationRequest(prompt="a red circle", seed=3, width=64, height=64, num_inference_steps=2)).result()
    assert isinstance(result, GenerationResult)
    assert result.image.shape == (64, 64, 3) and result.image.dtype == np.uint8
    assert result.seed == 3 and result.batch_size >= 1
    assert set(result.timings) == {"queue_s", "run_s"}
    assert result.timings["run_s"] > 0 and result.timings["queue_s"] >= 0


def test_handle_request_uses_model_defaults(engine):
    result = engine.generate.remote(GenerationRequest(prompt="a cat", num_inference_steps=1)).result()
    assert result.image.shape == (128, 128, 3)


def test_handle_errors_keep_their_type_and_status(engine):
    with pytest.raises(InvalidRequestError) as info:
        engine.generate.remote(GenerationRequest(prompt="x", width=4096, height=4096)).result()
    assert info.value.status_code == 400 and info.value.param == "width"


def test_handle_rejects_a_non_request(engine):
    with pytest.raises(InvalidRequestError):
        engine.generate.remote({"prompt": "x"}).result()


def _wait_for_progress(engine, request_id: str) -> dict:
    for _ in range(600):
        progress = engine.progress.remote(request_id).result()
        if progress and progress["step"] > 0:
            return progress
        time.sleep(0.05)
    raise AssertionError("the request never started")


def test_cancel_by_request_id_stops_denoising(engine):
    before = engine.stats.remote().result()["cancelled"]
    request = GenerationRequest(prompt="slow", seed=1, width=128, height=128, num_inference_steps=150, request_id="cancel-me")
    response = engine.generate.remote(request)
    progress = _wait_for_progress(engine, "cancel-me")
    assert progress["total"] == 150
    assert engine.cancel.remote("cancel-me").result() is True
    with pytest.raises(RequestCancelledError) as info:
        response.result()
    assert info.value.status_code == 409
    assert engine.stats.remote().result()["cancelled"] == before + 1
    assert engine.cancel.remote("cancel-me").result() is False  # no longer in flight


def test_cancelling_the_handle_response_stops_denoising(engine):
    before = engine.stats.remote().result()["cancelled"]
    request = GenerationRequest(prompt="slow", seed=2, width=128, height=128, num_inference_steps=150, request_id="drop-me")
    response = engine.generate.remote(request)
    _wait_for_progress(engine, "drop-me")
    response.cancel()
    with pytest.raises(ServeRequestCancelledError):
        response.result()
    for _ in range(200):  # the engine drops the row at its next denoising step
        if engine.stats.remote().result()["cancelled"] == before + 1:
            break
        time.sleep(0.05)
    assert engine.stats.remote().result()["cancelled"] == before + 1


def test_duplicate_request_id_in_flight_is_rejected(engine):
    request = GenerationRequest(prompt="slow", seed=2, width=128, height=128, num_inference_steps=150, request_id="twice")
    first = engine.generate.remote(request)
    _wait_for_progress(engine, "twice")
    with pytest.raises(InvalidRequestError) as info:
        engine.generate.remote(request).result()
    assert info.value.param == "request_id"
    engine.cancel.remote("twice").result()
    with pytest.raises(RequestCancelledError):
        first.result()


def test_img2img_and_inpaint_through_a_handle(engine):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:, :48] = 255
    img2img = engine.generate.remote(GenerationRequest(prompt="x", kind="img2img", init_image=image, seed=1, num_inference_steps=4))
    inpaint = engine.generate.remote(
        GenerationRequest(prompt="x", kind="inpaint", init_image=image, mask_image=mask, padding_mask_crop=0, seed=1, num_inference_steps=4)
    )
    assert img2img.result().image.shape == (64, 96, 3)
    painted = inpaint.result().image
    assert np.array_equal(painted[:, 48:], image[:, 48:])


def test_generate_stream_reports_progress_then_the_result(engine):
    from deployments.types import ProgressEvent

    request = GenerationRequest(prompt="x", seed=4, width=64, height=64, num_inference_steps=5)
    events = list(engine.options(stream=True).generate_stream.remote(request))
    progress, result = events[:-1], events[-1]
    assert [(e.step, e.total) for e in progress] == [(i, 5) for i in range(1, 6)]
    assert all(isinstance(e, ProgressEvent) for e in progress)
    assert isinstance(result, GenerationResult) and result.seed == 4
    alone = engine.generate.remote(request.model_copy(update={"request_id": "again"})).result()
    assert np.array_equal(alone.image, result.image)


def test_generate_stream_errors_are_raised(engine):
    stream = engine.options(stream=True).generate_stream.remote(GenerationRequest(prompt="x", width=4096, height=4096))
    with pytest.raises(InvalidRequestError):
        list(stream)
