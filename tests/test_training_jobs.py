"""Training jobs in the job manager, without Ray: the durable payload, progress with loss and
ETA, the LoRA as the result, cancel and failure discarding checkpoints (the fake engine)."""

import asyncio
import contextlib
import functools
import time
from typing import AsyncIterator, Awaitable, Callable

import numpy as np
import pytest

from configs.app_args import AppArgs
from deployments.training import LoraTrainingSettings, TrainingExample
from deployments.types import BASE_ROLE, ConflictError, EngineError
from serve_app.jobs.manager import JobManager
from serve_app.jobs.training_payload import TRAINING_KIND, TrainingPayload
from tests.fakes import FakeEngine, LocalHandle


def _payload(steps: int = 5) -> TrainingPayload:
    settings = LoraTrainingSettings(name="style", steps=steps, trigger_word="zz").with_defaults(64)
    image = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    return TrainingPayload(settings, [TrainingExample(image, "a red circle")])


def test_the_payload_round_trips_as_versioned_json_with_lossless_images():
    payload = _payload()
    data = payload.to_json()
    assert data["version"] == 1 and data["settings"]["resolution"] == 64 and isinstance(data["settings"]["seed"], int)
    again = TrainingPayload.from_json(data)
    assert again.settings == payload.settings and again.examples[0].caption == "a red circle"
    assert np.array_equal(again.examples[0].image, payload.examples[0].image)
    with pytest.raises(ValueError, match="training payload version 9"):
        TrainingPayload.from_json({**data, "version": 9})


@contextlib.asynccontextmanager
async def _manager(tmp_path, engine: FakeEngine) -> AsyncIterator[JobManager]:
    """A real job manager over `engine` in `tmp_path`, its loops stopped on exit."""
    config = AppArgs.model_validate({"state_dir": str(tmp_path)}).with_state_paths()
    manager = JobManager.__new__(JobManager)
    await manager.__init__({BASE_ROLE: LocalHandle(engine)}, config.jobs.model_dump(), {})
    try:
        yield manager
    finally:
        for loop in manager._loops:
            loop.cancel()


def _sync(scenario: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """A test of an async scenario, run on its own event loop (as tests/test_jobs_manager.py does)."""

    @functools.wraps(scenario)
    def test(tmp_path) -> None:
        asyncio.run(scenario(tmp_path))

    return test


async def _until(manager: JobManager, job_id: str, done, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = await manager.get(job_id)
        if done(view):
            return view
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} stayed {view}")


@_sync
async def test_a_training_job_reports_loss_and_eta_and_answers_the_lora(tmp_path):
    engine = FakeEngine(delay_s=0.2)
    async with _manager(tmp_path, engine) as manager:
        view = await manager.submit(_payload(), TRAINING_KIND)
        assert view["kind"] == TRAINING_KIND and view["images"] == 0 and view["progress"]["total"] == 5
        running = await _until(manager, view["id"], lambda v: v["training"] is not None)
        assert set(running["training"]) == {"loss", "eta_s", "paused"}
        done = await _until(manager, view["id"], lambda v: v["status"] == "succeeded")
        assert done["training"]["lora"] == "style" and done["progress"]["percent"] == 100.0
        assert await manager.result(view["id"]) == (view["id"].encode(), "application/octet-stream", "style.safetensors")
        (job_id, settings, examples), = engine.trainings
        assert job_id == view["id"] and settings.trigger_word == "zz" and examples[0].image.shape == (64, 64, 3)


@_sync
async def test_cancelling_a_training_job_discards_its_checkpoints(tmp_path):
    engine = FakeEngine(delay_s=30)
    async with _manager(tmp_path, engine) as manager:
        view = await manager.submit(_payload(), TRAINING_KIND)
        await _until(manager, view["id"], lambda v: v["status"] == "running")
        cancelled = await manager.cancel(view["id"])
        assert cancelled["status"] == "cancelled" and engine.discarded == [view["id"]]


@_sync
async def test_a_training_job_out_of_attempts_fails_and_discards_its_checkpoints(tmp_path):
    engine = FakeEngine()
    engine.failures = [EngineError("lost", code="engine_failure"), EngineError("lost again", code="engine_failure")]
    async with _manager(tmp_path, engine) as manager:
        view = await manager.submit(_payload(), TRAINING_KIND)
        failed = await _until(manager, view["id"], lambda v: v["status"] == "failed")
        assert failed["attempts"] == 2 and engine.discarded == [view["id"]]


@_sync
async def test_a_second_job_for_a_name_being_trained_is_refused(tmp_path):
    async with _manager(tmp_path, FakeEngine(delay_s=30)) as manager:
        await manager.submit(_payload(), TRAINING_KIND)
        with pytest.raises(ConflictError, match="already making LoRA 'style'") as refused:
            await manager.submit(_payload(), TRAINING_KIND)
        assert refused.value.param == "name" and refused.value.code == "lora_exists"
