"""The job manager: one replica that owns the job store, runs queued jobs on the engines, reports
per-job progress, honours cancel, retries jobs whose engine replica died, fires webhooks and
deletes expired results.

It lives in the Face (no torch): it sends `GenerationRequest`s to the base deployment through a
streaming handle (`generate_stream`), so progress comes from the denoising loop itself.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Optional, Union

from ray import serve
from ray.serve.exceptions import BackPressureError

from configs.app_args import JobsConfig
from deployments.logs import quiet_client_errors
from deployments.training import TrainingProgress
from deployments.types import (
    BASE_ROLE,
    ConflictError,
    DeadlineExceededError,
    GenerationRequest,
    GenerationResult,
    GoneError,
    NotFoundError,
    OverloadedError,
    ProgressEvent,
    ServiceError,
    TooManyRequestsError,
    engine_handle,
    refiner_handle,
    unwrap_error,
)
from serve_app.jobs import webhooks
from serve_app.jobs.archive import build_result
from serve_app.jobs.payload import JobPayload
from serve_app.jobs.store import JobRecord, SqliteJobStore
from serve_app.jobs.training_payload import TRAINING_KIND, TrainingPayload
from serve_app.metrics import FaceMetrics
from serve_app.quotas import RateLimiter

logger = logging.getLogger("ray.serve")

#: Write progress to the store at most this often per job (plus the first and last step).
_PROGRESS_WRITE_S = 0.25
#: First wait before asking a full engine again (doubles up to the last value): a job waits for
#: capacity instead of failing, and without spending an attempt.
_BUSY_RETRY_S = (0.5, 10.0)


def job_view(job: JobRecord) -> dict[str, Any]:
    """The public JSON of a job (API responses, SSE events, webhooks)."""
    result = None
    if job.status == "succeeded":
        result = {"media_type": job.result_media_type, "name": job.result_name, "expires_at": job.expires_at}
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "kind": job.kind,
        "images": job.images,
        "progress": {"step": job.progress_step, "total": job.progress_total, "percent": round(job.progress_percent, 1)},
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "error": job.error,
        "seeds": job.seeds,
        "result": result,
        **({"training": job.training} if job.kind == TRAINING_KIND else {}),
    }


def _error_dict(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ServiceError):
        return {"message": exc.message, "type": exc.error_type, "code": exc.code}
    return {"message": "the engine failed while running the job", "type": "server_error", "code": "engine_failure"}


def _retryable(exc: BaseException) -> bool:
    """Engine failures and lost replicas are retried; a request the engine rejected is not."""
    return not isinstance(exc, ServiceError) or exc.status_code >= 500


class JobManager:
    async def __init__(
        self, engines: dict[str, Any], jobs: dict[str, Any], controlnet_roles: Optional[dict[str, str]] = None,
        lora_routing: str = "multiplexed",
    ):
        """`engines`: the engine handles by role; `jobs`: a `JobsConfig` whose paths are resolved
        (`AppArgs.with_state_paths`); `controlnet_roles`: which role hosts each ControlNet
        (`AppArgs.controlnet_roles`); `lora_routing`: `loras.routing`."""
        quiet_client_errors()
        self._config = JobsConfig.model_validate(jobs)
        if self._config.db_path is None or self._config.results_dir is None:
            raise ValueError("jobs.db_path and jobs.results_dir must be resolved (AppArgs.with_state_paths)")
        self._store = SqliteJobStore(self._config.db_path, self._config.results_dir)
        self._engines = engines
        self._controlnet_roles = dict(controlnet_roles or {})
        self._lora_routing = lora_routing
        self._running: dict[str, asyncio.Task] = {}
        # Webhook deliveries in flight: the event loop only keeps weak references to tasks.
        self._deliveries: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._rates = RateLimiter()
        self._metrics = FaceMetrics()
        requeued, failed = self._store.requeue_running()
        if requeued or failed:
            logger.warning("job manager restarted: %d job(s) re-queued, %d failed (out of attempts)", requeued, failed)
        self._loops = [asyncio.create_task(self._dispatch_loop()), asyncio.create_task(self._cleanup_loop())]

    # -- the API the ingress calls -------------------------------------------------------------

    async def submit(
        self,
        payload: Union[JobPayload, TrainingPayload],
        kind: str,
        webhook_url: Optional[str] = None,
        owner: Optional[str] = None,
        concurrent_jobs: Optional[int] = None,
    ) -> dict[str, Any]:
        """Queue a job of `owner` (None: no tenant), who may have at most `concurrent_jobs`
        unfinished ones (429 beyond)."""
        if await self._db(self._store.count, "queued") >= self._config.max_queued:
            raise TooManyRequestsError(
                f"{self._config.max_queued} jobs are already queued; retry later", code="queue_full"
            )
        if concurrent_jobs is not None and await self._db(self._store.count_unfinished, owner) >= concurrent_jobs:
            raise TooManyRequestsError(
                f"{owner!r} already has {concurrent_jobs} unfinished jobs (its concurrent_jobs quota); retry when one ends",
                code="concurrent_jobs",
            )
        if kind == TRAINING_KIND:
            await self._check_name_free(payload.settings.name)
        job = JobRecord(
            id="job-" + uuid.uuid4().hex,
            kind=kind,
            owner=owner,
            max_attempts=self._config.max_attempts,
            images=0 if kind == TRAINING_KIND else len(payload.requests),
            progress_total=payload.settings.steps if kind == TRAINING_KIND else sum(r.progress_steps() for r in payload.requests),
            webhook_url=webhook_url,
            payload=payload.to_json(),
        )
        await self._db(self._store.create, job)
        self._wake.set()
        return job_view(job)

    def admit(self, key: str, limits: dict[str, Optional[int]], amounts: dict[str, int]) -> float:
        """Charge a key's per-minute quotas (`RateLimiter.admit`): 0.0 when admitted, else the
        seconds until it would be. Here because this is the app's one shared replica."""
        return self._rates.admit(key, limits, amounts)

    async def _check_name_free(self, name: str) -> None:
        """409 when an unfinished training job will publish a LoRA of this name (the registry's
        own names are the ingress's to check)."""
        for job in await self._db(self._store.unfinished, TRAINING_KIND):
            if job.payload is not None and job.payload["settings"]["name"] == name:
                raise ConflictError(
                    f"training job {job.id} is already making LoRA {name!r}; choose another name or cancel it",
                    param="name",
                    code="lora_exists",
                )

    async def get(self, job_id: str, owner: Optional[str] = None) -> dict[str, Any]:
        return job_view(await self._job(job_id, owner))

    async def list_jobs(self, limit: int = 20, owner: Optional[str] = None) -> list[dict[str, Any]]:
        return [job_view(job) for job in await self._db(self._store.list_jobs, limit, owner)]

    async def cancel(self, job_id: str, owner: Optional[str] = None) -> dict[str, Any]:
        job = await self._job(job_id, owner)
        error = {"message": "the job was cancelled", "type": "cancelled", "code": "cancelled"}
        cancelled = await self._db(
            self._store.update, job_id, only_if=("queued", "running"), status="cancelled",
            finished_at=time.time(), error=error,
        )
        if cancelled is None:
            raise ConflictError(f"job {job_id} already {job.status}", param="id", code="job_finished")
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()  # its streams close, and the engine stops these requests at the next step
        if cancelled.kind == TRAINING_KIND:
            await self._discard_training(job_id)
        self._ended(cancelled)
        return job_view(cancelled)

    async def result(self, job_id: str, owner: Optional[str] = None) -> tuple[bytes, str, str]:
        job = await self._job(job_id, owner)
        if job.status != "succeeded":
            raise ConflictError(f"job {job_id} is {job.status}; it has no result", param="id", code="no_result")
        found = await self._db(self._store.read_result, job_id)
        if found is None:
            raise GoneError(f"the result of job {job_id} has expired", param="id", code="result_expired")
        return found

    async def put_files(self, files: list[tuple[bytes, str]]) -> list[str]:
        expires_at = time.time() + self._config.file_ttl_s
        return [await self._db(self._store.put_file, data, media_type, expires_at) for data, media_type in files]

    async def get_file(self, file_id: str) -> tuple[bytes, str]:
        found = await self._db(self._store.get_file, file_id)
        if found is None:
            raise NotFoundError(f"file {file_id} does not exist or has expired", param="id", code="file_not_found")
        return found

    def check_health(self) -> None:
        for loop in self._loops:
            if loop.done():  # Ray restarts the replica, which re-queues what was running
                raise RuntimeError(f"job manager loop stopped: {loop.exception() if not loop.cancelled() else 'cancelled'}")

    # -- running jobs --------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._metrics.jobs_now(await self._db(self._store.count, "queued"), len(self._running))
            while len(self._running) < self._config.max_running:
                job = await self._db(self._store.claim_next)
                if job is None:
                    break
                task = asyncio.create_task(self._run_job(job))
                self._running[job.id] = task
                task.add_done_callback(lambda _, job_id=job.id: self._finished(job_id))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _finished(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._wake.set()

    async def _run_job(self, job: JobRecord) -> None:
        """One attempt; whatever happens, the job leaves `running` (done, failed or re-queued)."""
        try:
            await self._attempt(job)
        except asyncio.CancelledError:
            return  # cancelled through `cancel`, which already recorded it
        except BaseException as failure:  # noqa: BLE001 - every failure ends in a recorded state
            error = failure.exceptions[0] if isinstance(failure, BaseExceptionGroup) else failure
            await self._fail_or_retry(job, unwrap_error(error))

    async def _attempt(self, job: JobRecord) -> None:
        if job.kind == TRAINING_KIND:
            return await self._train(job)
        payload = JobPayload.from_json(job.payload)
        deadline = time.time() + self._config.run_timeout_s
        requests = [
            request.model_copy(update={"request_id": f"{job.id}-{index}-{job.attempts}", "deadline": deadline})
            for index, request in enumerate(payload.requests)
        ]

        def write_progress(step: int, total: int, percent: float) -> Awaitable:
            return self._db(
                self._store.update, job.id, only_if=("running",), progress_step=step, progress_total=total,
                progress_percent=percent,
            )

        # A retried job starts again from step 0: what the store shows is held until this attempt
        # passes it, so progress never goes down.
        progress = _Progress(write_progress, [r.progress_steps() for r in requests], floor=job.progress_percent)
        async with asyncio.TaskGroup() as group:  # one image failing cancels the others
            tasks = [group.create_task(self._run_one(r, index, progress)) for index, r in enumerate(requests)]
        results = [task.result() for task in tasks]
        data, media_type, name = await asyncio.to_thread(
            build_result, payload.requests, results, payload.output_format, payload.output_compression, payload.archive
        )
        expires_at = time.time() + self._config.result_ttl_s
        await self._db(self._store.save_result, job.id, data, media_type, name, expires_at)
        done = await self._db(
            self._store.update, job.id, only_if=("running",), status="succeeded", finished_at=time.time(),
            seeds=[r.seed for r in results], progress_step=progress.total, progress_total=progress.total,
            progress_percent=100.0,
        )
        if done is not None:
            self._ended(done)

    async def _train(self, job: JobRecord) -> None:
        """A training job: one stream to a base engine replica, which trains while it has no
        request to serve; its steps, loss and ETA go to the record as they come. No deadline:
        an off-peak job may wait hours for its window. A retried attempt resumes from the
        checkpoint the last one left."""
        payload = TrainingPayload.from_json(job.payload)
        settings = payload.settings
        written = [0.0]

        async def report(event: TrainingProgress) -> None:
            now = time.monotonic()
            if now - written[0] < _PROGRESS_WRITE_S and not event.paused:
                return
            written[0] = now
            await self._db(
                self._store.update, job.id, only_if=("running",), progress_step=event.step, progress_total=event.total,
                progress_percent=100.0 * event.step / max(1, event.total),
                training={"loss": event.loss, "eta_s": event.eta_s, "paused": event.paused},
            )

        result = await self._stream(
            self._engines[BASE_ROLE], "train_stream", report, job.id, settings, payload.examples, job.owner, deadline=None
        )
        expires_at = time.time() + self._config.result_ttl_s
        await self._db(self._store.save_result, job.id, result.data, "application/octet-stream", f"{result.name}.safetensors", expires_at)
        done = await self._db(
            self._store.update, job.id, only_if=("running",), status="succeeded", finished_at=time.time(),
            seeds=[settings.seed], progress_step=result.steps, progress_total=settings.steps, progress_percent=100.0,
            training={"loss": round(result.loss, 5), "eta_s": 0.0, "paused": False, "lora": result.name,
                      "train_s": result.train_s, "resumed_from": result.resumed_from},
        )
        if done is not None:
            self._ended(done)

    async def _discard_training(self, job_id: str) -> None:
        """Best effort: a given-up training job's checkpoints go (any base replica can remove
        them: they are in the shared `training.dir`)."""
        try:
            await self._engines[BASE_ROLE].discard_training.remote(job_id)
        except Exception:  # noqa: BLE001 - a leftover folder is not worth failing a cancel for
            logger.warning("could not discard the checkpoints of training job %s", job_id, exc_info=True)

    async def _run_one(self, request: GenerationRequest, index: int, progress: "_Progress") -> GenerationResult:
        """One image: its engine's stage, then (a refined request) the refiner's, with progress
        counted over both: the refiner's steps are estimated until its stage reports them."""
        engine = engine_handle(self._engines, request, self._controlnet_roles, self._lora_routing)
        refiner = refiner_handle(self._engines, request)
        if refiner is None:
            return await self._generate(engine, request, lambda step, total: progress.report(index, step, total))
        later = request.refiner.refiner_steps()
        handoff = await self._generate(engine, request, lambda step, total: progress.report(index, step, total + later))
        done = handoff.steps
        return await self._generate(
            refiner, request, lambda step, total: progress.report(index, done + step, done + total), handoff
        )

    async def _generate(
        self, engine: Any, request: GenerationRequest, report: Callable[[int, int], Awaitable], *args: Any
    ) -> Any:
        async def on_event(event: ProgressEvent) -> None:
            await report(event.step, event.total)

        return await self._stream(engine, "generate_stream", on_event, request, *args, deadline=request.deadline)

    async def _stream(
        self, engine: Any, method: str, report: Callable[[Any], Awaitable], *args: Any, deadline: Optional[float]
    ) -> Any:
        """One streaming engine call (`method`), its progress events to `report`, its last item
        returned; a full engine is waited out with backoff until `deadline` (None: no end)."""
        wait_s = _BUSY_RETRY_S[0]
        while True:
            stream = None
            try:
                stream = getattr(engine.options(stream=True), method).remote(*args)
                async for event in stream:
                    if isinstance(event, (ProgressEvent, TrainingProgress)):
                        await report(event)
                    else:
                        return event
                raise RuntimeError("the engine stream ended without a result")
            except Exception as exc:  # noqa: BLE001 - only a full engine is waited out here
                if not _engine_busy(exc):
                    raise
                if deadline is not None and time.time() + wait_s > deadline:
                    raise DeadlineExceededError("the engines stayed full until the job's deadline", code="timeout") from None
                logger.info("engine full; job %s call waits %.1fs", method, wait_s)
            finally:
                if stream is not None:  # no-op once finished; on cancel/failure it stops the engine's work
                    with contextlib.suppress(Exception):  # a refused call's cancel re-raises its refusal
                        stream.cancel()
            await asyncio.sleep(wait_s)
            wait_s = min(2 * wait_s, _BUSY_RETRY_S[1])

    async def _fail_or_retry(self, job: JobRecord, error: BaseException) -> None:
        if _retryable(error) and job.attempts < job.max_attempts:
            logger.warning("job %s attempt %d failed (%r); retrying", job.id, job.attempts, error)
            if await self._db(self._store.update, job.id, only_if=("running",), status="queued") is not None:
                self._wake.set()
            return
        logger.warning("job %s failed after %d attempt(s): %r", job.id, job.attempts, error)
        failed = await self._db(
            self._store.update, job.id, only_if=("running",), status="failed", finished_at=time.time(),
            error=_error_dict(error),
        )
        if failed is not None and failed.kind == TRAINING_KIND:
            await self._discard_training(job.id)
        if failed is not None:
            self._ended(failed)

    def _ended(self, job: JobRecord) -> None:
        """A job reached its final state: counted, and its webhook called."""
        self._metrics.job_ended(job.kind, job.status, job.images)
        self._notify(job)

    def _notify(self, job: JobRecord) -> None:
        if job.webhook_url:
            config = self._config
            delivery = asyncio.create_task(
                webhooks.deliver(
                    job.webhook_url, job_view(job), config.webhook_attempts, config.webhook_backoff_s, config.webhook_timeout_s,
                    secret=webhooks.resolve_secret(config.webhook_secret), allow=config.webhook_allow,
                )
            )
            self._deliveries.add(delivery)
            delivery.add_done_callback(self._deliveries.discard)

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.cleanup_interval_s)
            try:
                removed = await self._db(self._store.delete_expired, time.time())
                if removed:
                    logger.info("deleted %d expired result(s)/file(s)", removed)
            except Exception:  # a failed sweep is retried next interval
                logger.exception("cleaning up expired results failed")

    async def _job(self, job_id: str, owner: Optional[str]) -> JobRecord:
        job = await self._db(self._store.get, job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise NotFoundError(f"job {job_id} does not exist", param="id", code="job_not_found")
        return job

    @staticmethod
    async def _db(function, *args, **kwargs):
        # SQLite and file I/O off the event loop: progress of other jobs keeps flowing.
        return await asyncio.to_thread(function, *args, **kwargs)


class _Progress:
    """Per-job progress summed over its images, written to the store monotonically and throttled."""

    def __init__(self, write: Callable[[int, int, float], Awaitable], totals: list[int], floor: float = 0.0):
        """`floor`: the percent already shown (an earlier attempt's); nothing lower is written."""
        self._write = write
        self._steps = [0] * len(totals)
        self._totals = totals
        self._percent = floor
        self._written_at = 0.0

    @property
    def total(self) -> int:
        return sum(self._totals)

    async def report(self, index: int, step: int, total: int) -> None:
        self._steps[index], self._totals[index] = step, total
        percent = max(self._percent, 100.0 * sum(self._steps) / max(1, self.total))
        now = time.monotonic()
        if percent == self._percent or (now - self._written_at < _PROGRESS_WRITE_S and percent < 100.0):
            return
        self._percent, self._written_at = percent, now
        await self._write(sum(self._steps), self.total, percent)


def _engine_busy(exc: BaseException) -> bool:
    """The engine refused for capacity (its handle's queue or its own): worth waiting for."""
    exc = unwrap_error(exc)
    return isinstance(exc, BackPressureError) or (isinstance(exc, OverloadedError) and exc.code == "overloaded")


#: One replica: it owns the SQLite file. Ray restarts it if it dies; queued work survives.
JobManagerDeployment = serve.deployment(name="JobManager", num_replicas=1, max_ongoing_requests=1000)(JobManager)
