"""The job manager and store without Ray: a fake engine streams progress and results."""

import asyncio
import io
import json
import zipfile

import numpy as np
import pytest

from configs.model_spec import TinySpec
from deployments.types import EngineError, GenerationRequest, GenerationResult, InvalidRequestError, OverloadedError, ProgressEvent
from deployments.types import ConflictError, ControlRef, NotFoundError, HiresSettings, RefinerSettings, TooManyRequestsError
from serve_app.jobs.manager import JobManager
from serve_app.jobs.payload import JobPayload
from serve_app.jobs.store import JobRecord, SqliteJobStore


class _Stream:
    def __init__(self, engine, request):
        self._engine, self._request = engine, request
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self._events()

    async def _events(self):
        engine, request = self._engine, self._request
        engine.started.append(request.request_id)
        await engine.gate.wait()
        failure = engine.failures.pop(0) if engine.failures else None
        if failure is not None:
            raise failure
        for step in range(1, request.num_inference_steps + 1):
            await asyncio.sleep(0)
            yield ProgressEvent(step, request.num_inference_steps)
            if engine.fail_at_step and engine.fail_at_step[0] == step:
                _, error = engine.fail_at_step
                engine.fail_at_step = None
                raise error
        image = np.full((request.height, request.width, 3), request.seed % 256, dtype=np.uint8)
        yield GenerationResult(request.request_id, image, request.seed, 1, {"queue_s": 0.0, "run_s": 0.0})


class FakeEngine:
    """Mimics `handle.options(stream=True).generate_stream.remote(request)`."""

    def __init__(self):
        self.started: list[str] = []
        self.failures: list[BaseException] = []
        #: (step, error): fail once after reporting that step.
        self.fail_at_step = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.streams: list[_Stream] = []

    def options(self, stream: bool):
        assert stream
        return self

    @property
    def generate_stream(self):
        return self

    def remote(self, request):
        stream = _Stream(self, request)
        self.streams.append(stream)
        return stream


def _payload(n=1, steps=3, **kwargs) -> JobPayload:
    requests = [
        GenerationRequest(prompt="p", seed=10 + i, num_inference_steps=steps, width=64, height=64).with_defaults(TinySpec())
        for i in range(n)
    ]
    return JobPayload(requests, **kwargs)


def _config(tmp_path, **overrides) -> dict:
    return {"db_path": str(tmp_path / "jobs.sqlite3"), "results_dir": str(tmp_path / "results"), **overrides}


async def _manager(tmp_path, engine, **overrides) -> JobManager:
    manager = JobManager.__new__(JobManager)
    await manager.__init__({"base": engine}, _config(tmp_path, **overrides))
    return manager


async def _wait_done(manager, job_id, timeout=10.0) -> dict:
    for _ in range(int(timeout / 0.02)):
        job = await manager.get(job_id)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} still {job['status']}")


def _stop(manager):
    for loop in manager._loops:
        loop.cancel()


def test_job_runs_and_stores_a_single_image(tmp_path):
    async def scenario():
        manager = await _manager(tmp_path, FakeEngine())
        view = await manager.submit(_payload(), "txt2img")
        assert view["status"] == "queued" and view["progress"]["total"] == 3
        job = await _wait_done(manager, view["id"])
        data, media_type, name = await manager.result(view["id"])
        _stop(manager)
        return job, data, media_type, name

    job, data, media_type, name = asyncio.run(scenario())
    assert job["status"] == "succeeded" and job["progress"]["percent"] == 100.0 and job["seeds"] == [10]
    assert media_type == "image/png" and name == "image.png" and data.startswith(b"\x89PNG")


def test_several_images_make_a_zip_with_manifest(tmp_path):
    async def scenario():
        manager = await _manager(tmp_path, FakeEngine())
        view = await manager.submit(_payload(n=3, output_format="jpeg"), "txt2img")
        await _wait_done(manager, view["id"])
        result = await manager.result(view["id"])
        _stop(manager)
        return result

    data, media_type, _ = asyncio.run(scenario())
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert media_type == "application/zip"
    assert sorted(archive.namelist()) == ["0000.jpg", "0001.jpg", "0002.jpg", "manifest.json"]
    manifest = json.loads(archive.read("manifest.json"))
    assert [entry["seed"] for entry in manifest["images"]] == [10, 11, 12]
    assert manifest["images"][0]["prompt"] == "p" and "init_image" not in manifest["images"][0]


def test_queue_bound_answers_429(tmp_path):
    async def scenario():
        engine = FakeEngine()
        engine.gate.clear()  # nothing finishes
        manager = await _manager(tmp_path, engine, max_queued=2, max_running=1)
        first = await manager.submit(_payload(), "txt2img")
        for _ in range(40):
            if engine.started:
                break
            await asyncio.sleep(0.02)
        await manager.submit(_payload(), "txt2img")
        await manager.submit(_payload(), "txt2img")
        with pytest.raises(TooManyRequestsError) as info:
            await manager.submit(_payload(), "txt2img")
        _stop(manager)
        return first, info.value

    first, error = asyncio.run(scenario())
    assert error.status_code == 429


def test_cancelled_queued_job_never_runs(tmp_path):
    async def scenario():
        engine = FakeEngine()
        engine.gate.clear()
        manager = await _manager(tmp_path, engine, max_running=1)
        running = await manager.submit(_payload(), "txt2img")
        queued = await manager.submit(_payload(), "txt2img")
        await asyncio.sleep(0.2)
        cancelled = await manager.cancel(queued["id"])
        with pytest.raises(ConflictError):
            await manager.cancel(queued["id"])
        engine.gate.set()
        await _wait_done(manager, running["id"])
        await asyncio.sleep(0.2)
        final = await manager.get(queued["id"])
        _stop(manager)
        return engine, queued, cancelled, final

    engine, queued, cancelled, final = asyncio.run(scenario())
    assert cancelled["status"] == "cancelled" and final["status"] == "cancelled"
    assert final["attempts"] == 0 and final["started_at"] is None
    assert not any(rid.startswith(queued["id"]) for rid in engine.started)


def test_cancelling_a_running_job_closes_its_streams(tmp_path):
    async def scenario():
        engine = FakeEngine()
        engine.gate.clear()
        manager = await _manager(tmp_path, engine)
        view = await manager.submit(_payload(n=2), "txt2img")
        for _ in range(50):
            if len(engine.started) == 2:
                break
            await asyncio.sleep(0.02)
        await manager.cancel(view["id"])
        await asyncio.sleep(0.1)
        job = await manager.get(view["id"])
        with pytest.raises(ConflictError):
            await manager.result(view["id"])
        _stop(manager)
        return engine, job

    engine, job = asyncio.run(scenario())
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
    assert all(stream.cancelled for stream in engine.streams)


def test_engine_failure_is_retried_then_succeeds(tmp_path):
    async def scenario():
        engine = FakeEngine()
        engine.failures = [RuntimeError("replica died")]
        manager = await _manager(tmp_path, engine, max_attempts=2)
        view = await manager.submit(_payload(), "txt2img")
        job = await _wait_done(manager, view["id"])
        _stop(manager)
        return job

    job = asyncio.run(scenario())
    assert job["status"] == "succeeded" and job["attempts"] == 2


def test_out_of_attempts_fails_with_a_clear_error(tmp_path):
    async def scenario():
        engine = FakeEngine()
        engine.failures = [EngineError("boom", code="engine_error"), EngineError("boom", code="engine_error")]
        manager = await _manager(tmp_path, engine, max_attempts=2)
        view = await manager.submit(_payload(), "txt2img")
        job = await _wait_done(manager, view["id"])
        _stop(manager)
        return job

    job = asyncio.run(scenario())
    assert job["status"] == "failed" and job["attempts"] == 2
    assert job["error"] == {"message": "boom", "type": "server_error", "code": "engine_error"}


def test_rejected_request_is_not_retried(tmp_path):
    async def scenario():
        engine = FakeEngine()
        engine.failures = [InvalidRequestError("bad width", param="width")]
        manager = await _manager(tmp_path, engine, max_attempts=3)
        view = await manager.submit(_payload(), "txt2img")
        job = await _wait_done(manager, view["id"])
        _stop(manager)
        return job

    job = asyncio.run(scenario())
    assert job["status"] == "failed" and job["attempts"] == 1 and job["error"]["type"] == "invalid_request_error"


def test_restart_requeues_running_jobs_and_keeps_results(tmp_path):
    async def first_life():
        engine = FakeEngine()
        manager = await _manager(tmp_path, engine)
        done = await manager.submit(_payload(), "txt2img")
        await _wait_done(manager, done["id"])
        engine.gate.clear()
        stuck = await manager.submit(_payload(), "txt2img")
        for _ in range(50):
            if (await manager.get(stuck["id"]))["status"] == "running":
                break
            await asyncio.sleep(0.02)
        _stop(manager)  # the replica "dies" with a job running
        for task in list(manager._running.values()):
            task.cancel()
        return done["id"], stuck["id"]

    async def second_life(done_id, stuck_id):
        manager = await _manager(tmp_path, FakeEngine())
        result = await manager.result(done_id)
        job = await _wait_done(manager, stuck_id)
        _stop(manager)
        return result, job

    done_id, stuck_id = asyncio.run(first_life())
    # the killed process never recorded anything after "running"
    store = SqliteJobStore(str(tmp_path / "jobs.sqlite3"), str(tmp_path / "results"))
    store.update(stuck_id, status="running")
    result, job = asyncio.run(second_life(done_id, stuck_id))
    assert result[0].startswith(b"\x89PNG")
    assert job["status"] == "succeeded" and job["attempts"] == 2


def test_unknown_job_is_404(tmp_path):
    async def scenario():
        manager = await _manager(tmp_path, FakeEngine())
        try:
            with pytest.raises(NotFoundError):
                await manager.get("job-nope")
            with pytest.raises(NotFoundError):
                await manager.get_file("file-nope")
        finally:
            _stop(manager)

    asyncio.run(scenario())


def test_store_claims_each_job_once_and_expires_results(tmp_path):
    store = SqliteJobStore(str(tmp_path / "db.sqlite3"), str(tmp_path / "results"))
    store.create(JobRecord(id="a", created_at=1.0))
    store.create(JobRecord(id="b", created_at=2.0))
    assert store.claim_next().id == "a" and store.claim_next().id == "b" and store.claim_next() is None
    store.save_result("a", b"bytes", "image/png", "image.png", expires_at=10.0)
    file_id = store.put_file(b"file", "image/png", expires_at=10.0)
    assert store.read_result("a")[0] == b"bytes" and store.get_file(file_id) is None  # 10.0 is long past
    assert store.delete_expired(now=20.0) == 2
    assert store.read_result("a") is None
    assert store.update("a", only_if=("queued",), status="failed") is None
    assert store.get("a").status == "running"


def test_a_retried_job_never_shows_less_progress(tmp_path, monkeypatch):
    """The first attempt dies at step 6 of 10; the second starts from 0, but what the job shows
    is held until the new attempt passes it (the README's promise)."""
    from serve_app.jobs import manager as manager_module

    monkeypatch.setattr(manager_module, "_PROGRESS_WRITE_S", 0.0)  # write every step
    written = []

    async def scenario():
        engine = FakeEngine()
        engine.fail_at_step = (6, RuntimeError("replica died"))
        manager = await _manager(tmp_path, engine, max_attempts=2)
        original = manager._store.update

        def record(job_id, only_if=None, **fields):
            if "progress_percent" in fields:
                written.append(fields["progress_percent"])
            return original(job_id, only_if=only_if, **fields)

        manager._store.update = record
        view = await manager.submit(_payload(steps=10), "txt2img")
        job = await _wait_done(manager, view["id"])
        _stop(manager)
        return job

    job = asyncio.run(scenario())
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert written[:6] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert written == sorted(written) and written[-1] == 100.0


def test_a_full_engine_is_waited_out_without_spending_an_attempt(tmp_path):
    from ray.serve.exceptions import BackPressureError

    async def scenario():
        engine = FakeEngine()
        engine.failures = [BackPressureError(num_queued_requests=8, max_queued_requests=8), OverloadedError("full", code="overloaded")]
        manager = await _manager(tmp_path, engine, max_attempts=1)
        view = await manager.submit(_payload(), "txt2img")
        job = await _wait_done(manager, view["id"])
        _stop(manager)
        return engine, job

    engine, job = asyncio.run(scenario())
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert len(engine.started) == 3  # refused twice, then run


def test_a_lost_replica_is_retried_as_a_new_attempt(tmp_path):
    async def scenario():
        engine = FakeEngine()
        engine.failures = [OverloadedError("the engine replica was lost", code="engine_unavailable")]
        manager = await _manager(tmp_path, engine, max_attempts=2)
        view = await manager.submit(_payload(), "txt2img")
        job = await _wait_done(manager, view["id"])
        _stop(manager)
        return job

    assert asyncio.run(scenario())["attempts"] == 2


def test_jobs_are_stored_as_versioned_json_in_private_files(tmp_path):
    import sqlite3
    import stat

    image = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    control = ControlRef(name="canny", image=255 - image, conditioning_scale=0.5, preprocess="canny", high_threshold=0.3)
    request = GenerationRequest(
        prompt="p", kind="img2img", init_image=image, seed=4, num_inference_steps=4, controlnets=(control,),
        refiner=RefinerSettings(mode="post", strength=0.5),
    )

    async def scenario():
        manager = await _manager(tmp_path, FakeEngine())
        view = await manager.submit(JobPayload([request.with_defaults(TinySpec())], "webp", 80), "img2img")
        await _wait_done(manager, view["id"])
        _stop(manager)
        return view["id"]

    job_id = asyncio.run(scenario())
    (raw,) = sqlite3.connect(tmp_path / "jobs.sqlite3").execute("SELECT payload FROM jobs WHERE id = ?", (job_id,)).fetchone()
    stored = json.loads(raw)
    assert stored["version"] == 7 and stored["output_format"] == "webp" and "handoff" not in stored["requests"][0]
    restored = JobPayload.from_json(stored).requests[0]
    assert np.array_equal(restored.init_image, image) and restored.seed == 4 and restored.strength == 0.75
    assert restored.refiner == RefinerSettings(mode="post", strength=0.5, steps=4)  # stored resolved
    version_2 = {**stored, "version": 2, "requests": [{k: v for k, v in stored["requests"][0].items() if k != "refiner"}]}
    assert JobPayload.from_json(version_2).requests[0].refiner is None
    version_3 = {**stored, "version": 3, "requests": [{k: v for k, v in stored["requests"][0].items() if k != "hires"}]}
    assert JobPayload.from_json(version_3).requests[0].hires is None
    hires = GenerationRequest(prompt="p", width=64, height=64, hires=HiresSettings(scale=1.5)).with_defaults(TinySpec())
    (hires_back,) = JobPayload.from_json(json.loads(json.dumps(JobPayload([hires]).to_json()))).requests
    assert hires_back.hires == hires.hires and hires_back.hires.width == 96  # stored resolved: the size, not the scale
    early = GenerationRequest(prompt="p", guidance_end=0.6).with_defaults(TinySpec())
    (early_back,) = JobPayload.from_json(json.loads(json.dumps(JobPayload([early]).to_json()))).requests
    assert early_back.guidance_end == 0.6
    version_4 = {**stored, "version": 4, "requests": [{k: v for k, v in stored["requests"][0].items() if k != "guidance_end"}]}
    assert JobPayload.from_json(version_4).requests[0].guidance_end == 1.0  # guided on every step, as it was
    (restored_control,) = restored.controlnets
    assert np.array_equal(restored_control.image, control.image)
    assert restored_control.model_dump(exclude={"image"}) == control.model_dump(exclude={"image"})
    assert restored_control.model_fields_set == control.model_fields_set  # low_threshold stays "not given"
    version_1 = {**stored, "version": 1, "requests": [{k: v for k, v in stored["requests"][0].items() if k != "controlnets"}]}
    assert JobPayload.from_json(version_1).requests[0].controlnets == ()
    for path in [tmp_path / "jobs.sqlite3", *(tmp_path / "results").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "results").stat().st_mode) == 0o700
    with pytest.raises(ValueError, match="version"):
        JobPayload.from_json({**stored, "version": 99})


def test_jobs_pickled_by_an_older_version_fail_instead_of_loading(tmp_path):
    import pickle
    import sqlite3

    store = SqliteJobStore(str(tmp_path / "jobs.sqlite3"), str(tmp_path / "results"))
    store.create(JobRecord(id="old-queued"))
    store.create(JobRecord(id="old-done", status="succeeded"))
    db = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    db.execute("UPDATE jobs SET payload = ?", (pickle.dumps({"evil": True}),))
    db.execute("PRAGMA user_version = 0")
    db.close()
    reopened = SqliteJobStore(str(tmp_path / "jobs.sqlite3"), str(tmp_path / "results"))
    queued, done = reopened.get("old-queued"), reopened.get("old-done")
    assert queued.status == "failed" and queued.error["code"] == "stale_job" and queued.payload is None
    assert done.status == "succeeded" and done.payload is None


def test_webhook_urls_are_logged_without_secrets(caplog):
    from serve_app.jobs import webhooks

    url = "http://127.0.0.1:9/hook?token=s3cret&user=me"
    assert webhooks.redact_url("https://user:pw@example.com:8443/cb?token=abc") == "https://example.com:8443/cb?token=***"
    with caplog.at_level("WARNING", logger="ray.serve"):
        delivered = asyncio.run(
            webhooks.deliver(url, {"id": "job-1"}, attempts=1, backoff_s=0.01, timeout_s=1, allow=["127.0.0.1"])
        )
    assert delivered is False and caplog.records
    assert "s3cret" not in caplog.text and "token=***" in caplog.text
