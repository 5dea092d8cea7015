"""The base SDXL deployment: one pipeline per replica, dynamic batching with `@serve.batch`.

The request path reads decode → batch → predict → unbatch: `generate` resolves defaults and
checks limits for one request, `@serve.batch` gathers concurrent ones, the batch runner fuses
compatible requests into one pipeline call (in a worker thread, so the replica keeps answering
`cancel`, `progress` and health checks), and each caller gets its own `GenerationResult` back.

torch and diffusers are imported in `__init__`, not at module level: the app builder imports this
module to bind the graph and stays light; only the replica loads the heavy stack.
"""

import asyncio
import logging
import time
from collections import Counter, deque
from typing import Any, AsyncIterator, Callable, Optional

import numpy as np
from pydantic import TypeAdapter
from ray import serve
from ray.serve.metrics import Counter as MetricCounter
from ray.serve.metrics import Histogram

from configs.app_args import BatchingConfig, LimitsConfig
from configs.model_spec import ModelSpec
from deployments.logs import quiet_client_errors
from deployments.types import (
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    ProgressEvent,
    ServiceError,
    check_limits,
)

logger = logging.getLogger("ray.serve")

#: How many recent group sizes `stats()` keeps (enough for a benchmark run, bounded for a server).
_RECENT_GROUPS = 10_000


class SDXLBase:
    """Text-to-image on one SDXL pipeline; `generate` is the handle API other Ray apps call."""

    def __init__(self, model_spec: dict[str, Any], batching: dict[str, Any], limits: dict[str, Any]):
        from deployments.batching import BatchRunner, RequestControl
        from deployments.optimize import compile_cache_counts
        from deployments.pipelines import load_pipeline

        quiet_client_errors()
        self._spec = TypeAdapter(ModelSpec).validate_python(model_spec)
        self._limits = LimitsConfig.model_validate(limits)
        batching_config = BatchingConfig.model_validate(batching)
        self._generate_batch.set_max_batch_size(batching_config.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batching_config.batch_wait_timeout_s)

        self._new_control = RequestControl
        self._controls: dict[str, Any] = {}
        # Set while no batch runs. Ray's @serve.batch assembles the next batch while the current
        # one runs (only the run waits for the slot), so requests arriving mid-run would trickle
        # into small batches; holding them here until the slot frees lets them fill one batch.
        self._idle = asyncio.Event()
        self._idle.set()
        self._group_sizes: deque[int] = deque(maxlen=_RECENT_GROUPS)
        self._totals = Counter()
        self._group_size_metric = Histogram(
            "sdxl_group_size",
            description="Requests fused into one pipeline call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self._pipeline_calls_metric = MetricCounter(
            "sdxl_pipeline_calls", description="Pipeline calls (one per compatible group)."
        )

        started = time.perf_counter()
        self._pipe = load_pipeline(self._spec)
        self._runner = BatchRunner(self._pipe, on_group=self._record_group, buckets=self._spec.optimize.buckets())
        self.load_s = time.perf_counter() - started
        #: Compile-cache lookups during the warm-up (None without compile): shows a warm start.
        self.compile_cache: Optional[dict[str, int]] = None
        if self._spec.optimize.compile != "off":
            # Compile every bucket now (or load it from the compile cache), not on user requests.
            before = compile_cache_counts()
            self._runner.warmup([GenerationRequest(prompt="warm-up", seed=0).with_defaults(self._spec)])
            self.compile_cache = {name: count - before[name] for name, count in compile_cache_counts().items()}
            self._group_sizes.clear()
            self._totals.clear()
        self.warmup_s = time.perf_counter() - started - self.load_s
        logger.info(
            "loaded model %r (%s) on %s in %.1fs, warm-up %.1fs, compile cache %s",
            self._spec.name,
            self._spec.source,
            self._pipe.device,
            self.load_s,
            self.warmup_s,
            self.compile_cache,
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate one image. Raises a `ServiceError` subclass (with `status_code`) on failure."""
        return await self._generate(request, on_progress=None)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[Any]:
        """Generate one image, streaming progress: `ProgressEvent`s, then the `GenerationResult`.

        Call with `handle.options(stream=True)`. Cancelling the stream cancels the request.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_progress(step: int, total: int) -> None:  # called from the runner's thread
            loop.call_soon_threadsafe(events.put_nowait, ProgressEvent(step=step, total=total))

        task = asyncio.ensure_future(self._generate(request, on_progress=on_progress))
        try:
            while not task.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield task.result()
        finally:
            task.cancel()

    async def _generate(
        self, request: GenerationRequest, on_progress: Optional[Callable[[int, int], None]]
    ) -> GenerationResult:
        if not isinstance(request, GenerationRequest):
            raise InvalidRequestError(
                f"expected a GenerationRequest, got {type(request).__name__}", param="request"
            )
        request = request.with_defaults(self._spec)
        check_limits(request, self._limits)
        if request.request_id in self._controls:
            raise InvalidRequestError(
                f"request_id {request.request_id!r} is already in flight", param="request_id", code="duplicate_id"
            )
        control = self._new_control(deadline=request.deadline, on_progress=on_progress)
        self._controls[request.request_id] = control
        arrived = time.perf_counter()
        try:
            await self._idle.wait()
            outcome = await self._generate_batch(request, control, arrived)
        except asyncio.CancelledError:
            # The caller went away (client disconnect, handle `cancel()`): stop its denoising.
            control.cancel()
            raise
        finally:
            self._controls.pop(request.request_id, None)
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _generate_batch(
        self, requests: list[GenerationRequest], controls: list, arrivals: list[float]
    ) -> list:
        self._idle.clear()
        try:
            # The pipeline and the pixel conversion run in a worker thread, so this replica's
            # event loop keeps answering cancel, progress and health calls meanwhile.
            return await asyncio.to_thread(self._run_batch, requests, controls, arrivals)
        finally:
            self._idle.set()

    def _run_batch(self, requests: list[GenerationRequest], controls: list, arrivals: list[float]) -> list:
        started = time.perf_counter()
        outcomes = self._runner.run(requests, controls)
        batch_s = time.perf_counter() - started
        return [
            _to_result(request, outcome, queue_s=started - arrived, batch_s=batch_s)
            for request, outcome, arrived in zip(requests, outcomes, arrivals)
        ]

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

    def model_info(self) -> dict[str, Any]:
        """The served model's id and defaults (the ingress lists it at `/v1/models`)."""
        return {
            "id": self._spec.name,
            "source": self._spec.source,
            "device": str(self._pipe.device),
            "dtype": str(self._pipe.dtype).removeprefix("torch."),
            "default_size": list(self._spec.default_size),
            "load_s": round(self.load_s, 3),
            "warmup_s": round(self.warmup_s, 3),
            "optimize": self._spec.optimize.model_dump(),
            "compile_cache": self.compile_cache,
            # Seconds of one pipeline call per batch bucket, timed at warm-up: what groups are split by.
            "bucket_call_s": {size: round(seconds, 3) for size, seconds in self._runner.bucket_costs.items()},
        }

    def stats(self) -> dict[str, Any]:
        """Batching counters: pipeline calls, requests they served, calls stopped early, and the
        recent group sizes (requests fused per call)."""
        return {
            "pipeline_calls": self._totals["calls"],
            "requests": self._totals["requests"],
            "interrupted_calls": self._totals["interrupted"],
            "group_sizes": list(self._group_sizes),
        }

    def _record_group(self, report: Any) -> None:
        self._group_sizes.append(report.size)
        self._totals["calls"] += 1
        self._totals["requests"] += report.size
        self._totals["interrupted"] += report.interrupted
        self._group_size_metric.observe(report.size)
        self._pipeline_calls_metric.inc()
        logger.info(
            "pipeline call: %d request(s) fused, key=%s, %d/%d steps, %.3fs",
            report.size,
            report.key,
            report.steps_run,
            report.total_steps,
            report.run_s,
        )


def _to_result(request: GenerationRequest, outcome: Any, queue_s: float, batch_s: float) -> Any:
    """Unbatch one outcome: errors pass through, float pixels become uint8 like diffusers' PIL path."""
    if isinstance(outcome, ServiceError):
        return outcome
    pixels = np.clip(np.round(outcome.image * 255.0), 0, 255).astype(np.uint8)
    return GenerationResult(
        request_id=request.request_id,
        image=pixels,
        seed=outcome.seed,
        batch_size=outcome.batch_size,
        timings={"queue_s": round(queue_s, 4), "run_s": round(outcome.run_s, 4), "batch_s": round(batch_s, 4)},
    )


#: The Ray Serve deployment; `serve_app.builder` sets replicas, resources and batching per config.
SDXLBaseDeployment = serve.deployment(name="SDXLBase")(SDXLBase)
