"""The engine deployment: a Ray Serve replica around an injected step engine.

The replica builds its engine with the factory it is given (`EngineFactory` in the app; a fake in
tests) and runs the engine's loop on a thread of its own, so the replica's event loop stays free
for `generate`, `cancel`, `progress` and health checks. `generate` and `generate_stream` resolve
defaults, check limits, submit the request and await its outcome, which the engine thread hands
back with `call_soon_threadsafe`. The same class serves every engine role (the base, each
ControlNet variant, the refiner), under the deployment name the builder gives it.
"""

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Optional, Union

import numpy as np
from pydantic import TypeAdapter
from ray import serve
from ray.serve.metrics import Counter as MetricCounter
from ray.serve.metrics import Gauge
from ray.serve.metrics import Histogram

from configs.app_args import LimitsConfig
from configs.model_spec import ModelSpec
from deployments.engine.control import LatentsOutput, RequestControl, RunOutput
from deployments.engine.training_queue import TrainingControl
from deployments.logs import quiet_client_errors
from deployments.training import LoraTrainingSettings, TrainingExample
from deployments.types import (
    ControlRef,
    GenerationRequest,
    GenerationResult,
    Handoff,
    InvalidRequestError,
    ProgressEvent,
    ServiceError,
    check_limits,
    lora_set_id,
)

logger = logging.getLogger("ray.serve")


class EngineReplica:
    """Generation on one engine; `generate` is the handle API other Ray apps call."""

    def __init__(self, model_spec: dict[str, Any], limits: dict[str, Any], engine_factory: Callable[[Any], Any]):
        """`engine_factory(observer)` returns the engine (`StepEngine`'s `submit`, `stats`, `run`,
        `startup`, `max_rows`, `scheduling` and call planners)."""
        # When the constructor began (Unix seconds) and how long it took: a replica's time to
        # ready is spent before it (placement, the worker process, imports), in it (load and
        # warm-up) and after it (Serve marking the replica running); a warm restart on an H200
        # took 41-46 s of which load and warm-up were 24 s (BENCHMARKS.md).
        self._started_at = time.time()
        quiet_client_errors()
        self._spec = TypeAdapter(ModelSpec).validate_python(model_spec)
        self._limits = LimitsConfig.model_validate(limits)
        self._metrics = _RayMetrics()
        self._stop = threading.Event()
        built: Future = Future()
        self._thread = threading.Thread(target=self._build_and_run, args=(engine_factory, built), name="step-engine", daemon=True)
        self._thread.start()
        self._engine = built.result()  # a failed build (load, warm-up) fails the replica's start
        self._controls: dict[str, RequestControl] = {}
        self._lora_sets = _lora_routing(self._engine)
        self._start_s = time.time() - self._started_at
        logger.info("engine for %r ready: %s", self._spec.name, self._engine.startup)

    def _build_and_run(self, engine_factory: Callable[[Any], Any], built: Future) -> None:
        """The engine's thread: build the engine (load, warm-up), hand it over, then step until
        `close`. One thread does all of a replica's torch work because torch's OpenMP keeps a
        team of worker threads per thread that ran parallel ops, and with more of them than the
        host has cores libgomp stops its workers spinning between ops: every small op then waits
        for a sleeping worker. On the 2-core CPU box a tiny replica with a warm-up (compiled UNet,
        buckets [1, 8]) served 8 images (128², 20 steps) in 1.54 s when its warm-up had run on
        the constructor's thread, 0.85 s built here (BENCHMARKS.md, "One thread for a replica's
        torch work")."""
        try:
            engine = engine_factory(self._metrics)
        except BaseException as error:  # handed to __init__, which raises it
            built.set_exception(error)
            return
        built.set_result(engine)
        engine.run(self._stop)

    async def generate(self, request: GenerationRequest, handoff: Optional[Handoff] = None) -> Union[GenerationResult, Handoff]:
        """Generate one image. Raises a `ServiceError` subclass (with `status_code`) on failure.

        A request with `refiner` ends on the base (or ControlNet) engine as a `Handoff`; the
        refiner's engine takes the request with that `handoff` (a `DeploymentResponse` passed
        straight through: Ray resolves it here, the latents never pass the caller)."""
        return await self._generate(request, None, handoff)

    async def generate_stream(self, request: GenerationRequest, handoff: Optional[Handoff] = None) -> AsyncIterator[Any]:
        """Generate one image, streaming progress: `ProgressEvent`s, then the `GenerationResult`
        (or the `Handoff` of a base stage).

        Call with `handle.options(stream=True)`. Cancelling the stream cancels the request.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_progress(step: int, total: int) -> None:  # called from the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, ProgressEvent(step=step, total=total))

        task = asyncio.ensure_future(self._generate(request, on_progress, handoff))
        try:
            async for event in _events_until(task, events):
                yield event
            yield task.result()
        finally:
            task.cancel()

    async def _generate(
        self, request: GenerationRequest, on_progress: Optional[Callable[[int, int], None]], handoff: Optional[Handoff]
    ) -> Union[GenerationResult, Handoff]:
        if not isinstance(request, GenerationRequest):
            raise InvalidRequestError(
                f"expected a GenerationRequest, got {type(request).__name__}", param="request"
            )
        if handoff is not None:
            request = request.model_copy(update={"handoff": handoff})
        request = request.with_defaults(self._spec)
        check_limits(request, self._limits)
        set_id = lora_set_id(request.loras)
        if set_id is not None and self._lora_sets is not None:
            await self._lora_sets(set_id)  # tells Ray's router this replica holds the set
        if request.request_id in self._controls:
            raise InvalidRequestError(
                f"request_id {request.request_id!r} is already in flight", param="request_id", code="duplicate_id"
            )
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        control = RequestControl(
            deadline=request.deadline,
            on_progress=on_progress,
            on_done=lambda outcome: loop.call_soon_threadsafe(_resolve, done, outcome),
        )
        self._controls[request.request_id] = control
        try:
            self._engine.submit(request, control)
            outcome = await done
        except asyncio.CancelledError:
            # The caller went away (client disconnect, handle `cancel()`): its row is dropped at
            # the engine's next step, and its neighbours go on unchanged.
            control.cancel()
            raise
        finally:
            self._controls.pop(request.request_id, None)
        if isinstance(outcome, ServiceError):
            raise outcome
        return _to_result(request, outcome)

    async def train_stream(
        self, job_id: str, settings: LoraTrainingSettings, examples: list[TrainingExample], owner: Optional[str] = None
    ) -> AsyncIterator[Any]:
        """Train a LoRA while this replica has nothing to serve, streaming `TrainingProgress`
        events, then the `TrainingResult` (the LoRA is published in the registry by then). A job
        id this replica (or another) checkpointed resumes from there. Refused as `overloaded`
        while a run is in progress here. Cancelling the stream stops the run at its next step
        (its checkpoint stays until `discard_training`). The LoRA is `owner`'s (an API key's tenant)."""
        training = self._training()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        done: asyncio.Future = loop.create_future()
        control = TrainingControl(
            on_progress=lambda progress: loop.call_soon_threadsafe(events.put_nowait, progress),
            on_done=lambda outcome: loop.call_soon_threadsafe(_resolve, done, outcome),
        )
        training.submit(job_id, settings, examples, control, owner)
        try:
            async for event in _events_until(done, events):
                yield event
            if isinstance(done.result(), ServiceError):
                raise done.result()
            yield done.result()
        finally:
            if not done.done():
                control.cancel()

    def discard_training(self, job_id: str) -> None:
        """Remove the checkpoints of a training job given up (cancelled, out of attempts)."""
        self._training().discard(job_id)

    def _training(self) -> Any:
        if self._engine.background is None:
            raise InvalidRequestError("this deployment trains no LoRAs", param="kind", code="training_disabled")
        return self._engine.background

    def cancel(self, request_id: str) -> bool:
        """Cancel an in-flight request on this replica; False when it is not here (or done)."""
        control = self._controls.get(request_id)
        if control is None:
            return False
        control.cancel()
        return True

    def progress(self, request_id: str) -> Optional[dict[str, int]]:
        """Denoising progress of an in-flight request on this replica, or None."""
        control = self._controls.get(request_id)
        return None if control is None else {"step": control.step, "total": control.total}

    async def control_map(self, control: ControlRef) -> np.ndarray:
        """The map `control` steers with (its preprocessor run on its image): what
        `POST /v1/controlnets/preprocess` shows. Needs no ControlNet, so any engine answers."""
        from deployments.engine.controlnets import control_map  # torch: not where the builder imports this module

        return await asyncio.to_thread(control_map, control)

    async def describe_loras(self) -> list[dict[str, Any]]:
        """Every registered LoRA: what its header says, and whether it fits the served model
        (`fits`, and `error` saying why not)."""
        return await asyncio.to_thread(self._adapters().describe_all)

    async def check_lora(self, path: str, name: str) -> dict[str, Any]:
        """Describe an uploaded file and check it fits the served model; a 400 naming why not."""
        return await asyncio.to_thread(self._adapters().describe_file, path, name)

    def _adapters(self) -> Any:
        if self._engine.adapters is None:
            raise InvalidRequestError("this deployment serves no LoRAs", param="loras", code="loras_disabled")
        return self._engine.adapters

    def model_info(self) -> dict[str, Any]:
        """The served model's id and defaults, how the engine runs and how it started."""
        engine = self._engine
        return {
            "id": self._spec.name,
            "replica": _replica_id(),
            "source": self._spec.source,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "default_size": list(self._spec.default_size),
            # Above 1, requests that give no interval are served approximately (deep caching).
            "default_deep_cache_interval": self._spec.default_deep_cache_interval,
            "optimize": self._spec.optimize.model_dump(),
            "scheduling": engine.scheduling,
            "max_batch_size": engine.max_rows,
            "started_at": round(self._started_at, 3),
            "start_s": round(self._start_s, 3),
            **engine.startup,
            # Seconds of one call per compiled batch size, as priced now (timed at warm-up; the
            # UNet's then by the calls served): what forwards (UNet rows) and decodes (images)
            # are split by.
            "unet_call_s": {size: round(s, 4) for size, s in engine.forward_calls.costs.items()},
            "decode_call_s": {size: round(s, 4) for size, s in engine.decode_calls.costs.items()},
            # The timing rounds each cost is the least of (how far the warm-up's first ones were off).
            "unet_call_rounds_s": engine.forward_calls.timing_rounds,
        }

    def stats(self) -> dict[str, Any]:
        """The engine's counters (admitted, admitted into a running batch, completed, cancelled,
        forwards, UNet calls and padding), recent series (requests per forward, queue waits),
        row-steps per second over the last 10 s and the LoRA cache's (loads, hits, evictions,
        load seconds, resident sets); `replica` says which replica answered."""
        return {**self._engine.stats(), "replica": _replica_id()}

    def check_health(self) -> None:
        """Ray calls this every few seconds: a dead engine loop fails it (Ray replaces the
        replica), a live one exports its counts as metrics."""
        if not self._thread.is_alive():  # Ray restarts the replica
            raise RuntimeError("the engine loop thread stopped")
        self._metrics.export(self._engine.stats())

    def close(self) -> None:
        """Stop the engine's loop (Ray calls `__del__` when the replica shuts down)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __del__(self) -> None:
        self._stop.set()


async def _events_until(done: asyncio.Future, events: asyncio.Queue) -> AsyncIterator[Any]:
    """The events put on `events` (from the engine's thread) until `done` is, then those left."""
    while not done.done():
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({done, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
        else:
            getter.cancel()
    while not events.empty():
        yield events.get_nowait()


def _lora_routing(engine: Any) -> Optional[Callable[[str], Any]]:
    """A `serve.multiplexed` loader for LoRA set ids, sized like the engine's LoRA cache: calling
    it records the set as held by this replica, which Ray's router then prefers for requests
    naming that id (`handle.options(multiplexed_model_id=...)`). The engine loads the weights
    itself, between steps; Ray's record is the routing hint. None without LoRAs, or outside a
    Ray replica (in-process tests: there is no router to tell)."""
    if engine.adapters is None or _replica_id() is None:
        return None

    async def hold(set_id: str) -> str:
        return set_id

    return serve.multiplexed(max_num_models_per_replica=engine.adapters.size)(hold)


def _replica_id() -> Optional[str]:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a Ray replica (in-process tests)
        return None


def _resolve(future: asyncio.Future, outcome: Any) -> None:
    if not future.done():
        future.set_result(outcome)


def _to_result(request: GenerationRequest, outcome: Union[RunOutput, LatentsOutput]) -> Union[GenerationResult, Handoff]:
    """Float pixels become uint8 as diffusers' PIL path rounds them. A refined image's timings
    and batch size cover both stages."""
    timings = {"queue_s": outcome.queue_s, "run_s": outcome.run_s}
    batch_size = outcome.batch_size
    if isinstance(outcome, LatentsOutput):
        return Handoff(
            request.request_id, outcome.latents, outcome.generator_state, outcome.steps, batch_size,
            {name: round(seconds, 4) for name, seconds in timings.items()},
        )
    if request.handoff is not None:
        timings = {name: seconds + request.handoff.timings.get(name, 0.0) for name, seconds in timings.items()}
        batch_size = max(batch_size, request.handoff.batch_size)
    pixels = np.clip(np.round(outcome.image * 255.0), 0, 255).astype(np.uint8)
    return GenerationResult(
        request_id=request.request_id,
        image=pixels,
        seed=outcome.seed,
        batch_size=batch_size,
        timings={name: round(seconds, 4) for name, seconds in timings.items()},
    )


class _RayMetrics:
    """The engine's observer: Ray metrics, exported with Ray's others."""

    def __init__(self):
        self._rows = Histogram(
            "sdxl_rows_per_forward",
            description="Requests sharing one UNet forward (one denoising step of each).",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self._row_steps = MetricCounter("sdxl_row_steps", description="Denoising steps run, summed over requests.")
        self._queue_wait = Histogram(
            "sdxl_queue_wait_s",
            description="Seconds from reaching the engine to joining its running batch.",
            boundaries=[0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60],
        )
        self._into_running = MetricCounter(
            "sdxl_admitted_into_running", description="Requests admitted while others were mid-denoising."
        )
        self._lora_loads = Histogram(
            "sdxl_lora_load_s",
            description="Seconds to load a LoRA set into a slot (read, check, write); its count is the loads.",
            boundaries=[0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10],
        )
        self._lora_hits = MetricCounter("sdxl_lora_hits", description="Requests whose LoRA set was already resident.")
        self._lora_evictions = MetricCounter("sdxl_lora_evictions", description="LoRA sets evicted from a replica's slots.")
        self._lora_resident = Gauge("sdxl_lora_resident", description="LoRA sets resident in a replica's slots.")
        self._step_s = Histogram(
            "sdxl_step_s",
            description="Seconds of one UNet forward: a denoising step of every row in it.",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
        )
        self._queue = Gauge("sdxl_engine_queue", description="Requests in an engine replica, by state (waiting, active).", tag_keys=("state",))
        self._outcomes = MetricCounter(
            "sdxl_engine_requests",
            description="Requests an engine replica ended, by outcome (completed, failed, cancelled, expired).",
            tag_keys=("outcome",),
        )
        self._oom = MetricCounter(
            "sdxl_oom",
            description="GPU out-of-memory events: calls run again smaller (split), requests failed alone (failure).",
            tag_keys=("event",),
        )
        self._gpu_memory = Gauge(
            "sdxl_gpu_memory_mib", description="An engine replica's GPU memory, allocated and reserved by torch.", tag_keys=("kind",)
        )
        self._gc_pauses = MetricCounter(
            "sdxl_gc_pause_s",
            description="Seconds an engine replica's process stood still in garbage collections, full or young.",
            tag_keys=("generation",),
        )
        self._exported: dict[str, int] = {}

    def on_admit(self, queue_wait_s: float, into_running: bool) -> None:
        self._queue_wait.observe(queue_wait_s)
        if into_running:
            self._into_running.inc()

    def on_forward(self, rows: int, seconds: float) -> None:
        self._rows.observe(rows)
        self._row_steps.inc(rows)
        self._step_s.observe(seconds)

    def export(self, stats: dict[str, Any]) -> None:
        """The engine's counts as of now (`StepEngine.stats()`, read at each health check): queue
        gauges, and the outcome counters moved by what changed since the last export."""
        self._queue.set(stats["waiting"], tags={"state": "waiting"})
        self._queue.set(stats["active"], tags={"state": "active"})
        for kind, mib in stats.get("gpu_memory_mib", {}).items():
            self._gpu_memory.set(mib, tags={"kind": kind})
        counters = [(self._outcomes, "outcome", name, name) for name in ("completed", "failed", "cancelled", "expired")]
        counters += [(self._oom, "event", "split", "oom_splits"), (self._oom, "event", "failure", "oom_failures")]
        gc = stats["gc"]
        counts = {**stats, "gc_full_s": gc["full_seconds"], "gc_young_s": gc["seconds"] - gc["full_seconds"]}
        counters += [(self._gc_pauses, "generation", "full", "gc_full_s"), (self._gc_pauses, "generation", "young", "gc_young_s")]
        for metric, tag, value, name in counters:
            moved = counts.get(name, 0) - self._exported.get(name, 0)
            if moved > 0:
                metric.inc(moved, tags={tag: value})
            self._exported[name] = counts.get(name, 0)

    def on_lora_load(self, seconds: float, resident: int) -> None:
        self._lora_loads.observe(seconds)
        self._lora_resident.set(resident)

    def on_lora_hit(self) -> None:
        self._lora_hits.inc()

    def on_lora_evict(self, resident: int) -> None:
        self._lora_evictions.inc()
        self._lora_resident.set(resident)


#: The Ray Serve deployment; `serve_app.builder` names it per role and sets replicas and resources.
EngineDeployment = serve.deployment(EngineReplica)
