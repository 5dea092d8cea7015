"""`StepEngine`: the denoising loop the server owns, one step at a time.

Each `step()`:
1. drops the rows (and waiting requests) whose caller cancelled or whose deadline passed, and
   answers them at once;
2. admits waiting requests while there is room (at most `max_rows` active, so a stream of
   arrivals can add at most one text-encoder pass per step), the ones due earliest first (the
   step they arrived at plus their steps; a deep-cache request at a step where the running rows
   of its kind take a full step, `_in_phase`): their prompts in one pass, their latents from their
   own generators;
3. runs one UNet forward per group of rows that may share it (`sharing.forward_key`), every row
   with its own timestep, embeddings and `add_time_ids` (rows reusing kept deep features run the
   UNet's shallow branch: `deep_cache`). With compiled batch sizes, a forward is
   one call: of every row of the group when one call is their cheapest plan (`calls.plan_calls`
   on the measured cost of each size), else of the rows the plan's first call holds, the rows
   due earliest (admission step + their steps) first and the others waiting a step;
4. advances the rows that took the step, each with its own scheduler (guidance and inpainting's
   blend per row), and reports their progress;
5. retires the rows that finished: one VAE pass per shape, then each caller is answered; the base
   stage of a refined request is answered with its latents and generator state instead (no
   decode), which a refiner engine (`refiner=True`) continues as a row of its own; the first pass
   of a hires request becomes its second pass's row, active from the next step (images above
   `vae_tiling_above` pixels are encoded and decoded in tiles).

A call that runs out of GPU memory (the UNet's, the VAE decode's, the prompt encode's) runs again
as smaller calls, down to one request, which alone fails with a 503 (`out_of_memory`) while the
others go on (`StepEngine._split_on_oom`).

Two admission policies share this loop: `step` (the default) admits between any two steps;
`request` admits only into an empty engine, after waiting up to `batch_wait_s` for a batch to form
(the request-level batching this engine replaced, kept to compare the two in one run).

Thread model: `submit` and `RequestControl.cancel` may be called from any thread; `step` runs on
one thread (`run` is that thread's loop). Knows torch and diffusers, never Ray or HTTP.
"""

import logging
import statistics
import threading
import time
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionXLPipeline

from deployments.engine.call_clock import CallClock
from deployments.engine.calls import CallPlanner
from deployments.engine.control import LatentsOutput, RequestControl, RunOutput
from deployments.engine.controlnets import check_hosted, residuals
from deployments.engine.cuda_graphs import GraphedCalls
from deployments.engine.deep_cache import DeepCacheUNet
from deployments.engine.gc_pauses import GcPauses
from deployments.engine.lora import AdapterCache, rows_on_slots
from deployments.engine.profiling import profile_call
from deployments.engine.rows import Row, RowFactory, TextEmbeds, decode, to_pixels, vae_tiling
from deployments.engine.sharing import forward_key
from deployments.types import ControlRef, EngineError, GenerationRequest, InvalidRequestError, OverloadedError, ServiceError

logger = logging.getLogger(__name__)

Scheduling = Literal["step", "request"]

#: How many recent values `stats()` keeps per series (a benchmark run's worth, bounded).
_RECENT = 10_000
#: Row-steps per second are measured over this many recent seconds.
_RATE_WINDOW_S = 10.0
#: Calls a warm-up timing round makes per bucket (the round's value is their median).
_TIMED_CALLS = 3
#: A bucket's timing goes on round after round until two rounds agree within this fraction (at
#: least `_TIMING_MIN_ROUNDS`, at most `_TIMING_ROUNDS`); its cost is the least round. In process
#: on the H200 the warm-up's first round priced a 16-row call (regional compile) at 0.39-0.65 s
#: in all four processes measured, where the same call took 0.28 s moments later, and a planner
#: priced that way splits groups it should run whole; with rounds it priced 0.279 s. A transient
#: only ever adds time, so the least round is the steady cost. (A Serve replica's rounds were
#: slow in every round while its served calls were not: served calls re-price the buckets,
#: `CallPlanner.observed`; BENCHMARKS.md, "Prices from served calls".)
_TIMING_AGREEMENT = 0.1
_TIMING_MIN_ROUNDS = 2
_TIMING_ROUNDS = 6
#: Graphs dynamo may compile per code object beyond the warm-up's: its default `recompile_limit`.
_UNWARMED_GRAPHS = 8


class EngineObserver(Protocol):
    """What the engine tells its host as it runs (the Ray replica exports these as metrics)."""

    def on_admit(self, queue_wait_s: float, into_running: bool) -> None: ...

    def on_forward(self, rows: int, seconds: float) -> None: ...


class BackgroundWork(Protocol):
    """Work the loop runs a unit at a time while it has no request (LoRA training)."""

    #: Seconds the engine must have been idle before a unit runs (a gap between two requests
    #: of a burst is not idleness).
    idle_s: float

    def pending(self) -> bool: ...

    def run_step(self) -> None: ...

    def pause(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class _NoObserver:
    def on_admit(self, queue_wait_s: float, into_running: bool) -> None:
        pass

    def on_forward(self, rows: int, seconds: float) -> None:
        pass


@dataclass
class _Waiting:
    request: GenerationRequest
    control: RequestControl
    submitted_at: float
    #: The engine step it arrived at plus its steps: the step policy admits the lowest first.
    due: int
    #: The engine step it arrived at.
    arrived: int


class StepEngine:
    """Runs many requests as rows of one denoising loop over one pipeline's weights."""

    def __init__(
        self,
        pipeline: StableDiffusionXLPipeline,
        *,
        max_rows: int = 8,
        scheduling: Scheduling = "step",
        batch_wait_s: float = 0.0,
        max_waiting: Optional[int] = None,
        buckets: Optional[Sequence[int]] = None,
        unguided_bucket: bool = False,
        adapters: Optional[AdapterCache] = None,
        controlnets: Optional[Mapping[str, ControlNetModel]] = None,
        deep_cache: Optional[DeepCacheUNet] = None,
        graphs: Optional[GraphedCalls] = None,
        refiner: bool = False,
        vae_tiling_above: Optional[int] = None,
        observer: Optional[EngineObserver] = None,
        background: Optional[BackgroundWork] = None,
    ):
        """`max_rows`: most requests denoising at once. `max_waiting`: most requests waiting to be
        admitted (beyond it `submit` raises a 503); None is unbounded. `buckets`: the image batch
        sizes compiled graphs exist for; a forward of guided rows runs at twice these (each image
        is an unconditional and a conditional UNet row), a decode at these. `unguided_bucket`: a
        UNet call of one row is compiled too, so a lone row with guidance ≤ 1 (one UNet row) runs
        unpadded (needs `buckets`). `adapters`: the LoRA sets rows may use (None: requests with
        LoRAs are refused). `controlnets`: the ControlNets this engine hosts, by name (requests
        naming another are refused). `deep_cache`: the UNet's two passes for rows that keep deep
        features between steps (None: requests with `deep_cache_interval` > 1 are refused).
        `graphs`: small UNet calls without LoRA slots or ControlNets replay CUDA graphs (None: none do).
        `refiner`: `pipeline` is a refiner, which runs the refiner stage of requests (those with
        a `handoff`) and nothing else.
        `vae_tiling_above`: VAE encodes and decodes of images above this many pixels run tiled.
        `background`: work `run` does a unit at a time when no request is active or waiting (a
        `TrainingQueue`); requests always go first."""
        if scheduling not in ("step", "request"):
            raise ValueError(f"scheduling {scheduling!r} must be 'step' or 'request'")
        self._pipe = pipeline
        self._rows = RowFactory(pipeline)
        self.max_rows = max_rows
        self.scheduling = scheduling
        self.batch_wait_s = batch_wait_s
        self.max_waiting = max_waiting
        self.unguided_bucket = unguided_bucket
        self.forward_calls = CallPlanner(_unet_buckets(buckets, unguided_bucket))
        self.decode_calls = CallPlanner(buckets)
        # Times served UNet calls into `forward_calls`' prices, from the end of the warm-up's
        # timing on (None before: the warm-up's own calls include compiling).
        self._call_clock: Optional[CallClock] = None
        self.adapters = adapters
        self.controlnets = dict(controlnets or {})
        self.deep_cache = deep_cache
        self.graphs = graphs
        self.refiner = refiner
        self.vae_tiling_above = vae_tiling_above
        self._vae_dtype = pipeline.vae.dtype  # the dtype `_restore_vae` returns the VAE to
        self._warm_slot: Optional[int] = None  # the slot every row takes while warming up adapters
        # Dynamo's graphs per code object the warm-up made room for (None: no warm-up), set again
        # on each thread that steps (`_hold_warm_graphs`).
        self._recompile_limit: Optional[int] = None
        self._observer = observer or _NoObserver()
        self.background = background
        self._busy_until = 0.0  # when the loop last stepped: background work waits `idle_s` after it
        self._lock = threading.Condition()
        self._waiting: deque[_Waiting] = deque()
        self._active: list[Row] = []
        self._steps = 0  # steps run so far: the clock rows' due steps are counted on
        self._stats = _Stats()
        self._gc_pauses = GcPauses.installed()
        #: How the engine started (load and warm-up seconds, compile-cache lookups): set by its factory.
        self.startup: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self._rows.device

    @property
    def dtype(self) -> torch.dtype:
        return self._rows.dtype

    # -- the callers' side (any thread) ----------------------------------------------------------

    def submit(self, request: GenerationRequest, control: Optional[RequestControl] = None) -> RequestControl:
        """Queue a (defaults-resolved) request; returns its control, which `finish`es with the
        outcome. Raises `OverloadedError` (503) when `max_waiting` requests already wait."""
        if not _is_resolved(request):
            raise ValueError(f"request {request.request_id} has unresolved settings; call with_defaults(spec) first")
        check_hosted(request.controlnets, self.controlnets)
        if request.deep_cache_interval > 1 and self.deep_cache is None:
            raise InvalidRequestError(
                f"deep_cache_interval {request.deep_cache_interval} needs a deployment that caches deep features "
                "(model.optimize.deep_cache); leave it out or give 1",
                param="deep_cache_interval",
                code="deep_cache_disabled",
            )
        if (request.handoff is not None) != self.refiner:
            stage = "a refiner stage (a request with a handoff)" if self.refiner else "a base stage (no handoff)"
            raise InvalidRequestError(f"this engine runs {stage} only", param="handoff", code="wrong_stage")
        control = control or RequestControl(deadline=request.deadline)
        with self._lock:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise OverloadedError(
                    f"the engine has {len(self._waiting)} requests waiting; retry later", code="overloaded"
                )
            self._waiting.append(
                _Waiting(request, control, time.perf_counter(), self._steps + request.denoising_steps(), self._steps)
            )
            self._lock.notify_all()
        return control

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = {**self._stats.snapshot(), "waiting": len(self._waiting), "active": len(self._active)}
        stats["gc"] = self._gc_pauses.snapshot()  # process-wide: every thread stops while it collects
        # The UNet buckets' prices now (warm-up timing, then served calls; copied whole, since the
        # loop thread updates them) and how many served calls priced each.
        stats["unet_call_s"] = {size: round(seconds, 4) for size, seconds in dict(self.forward_calls.costs).items()}
        stats["unet_calls_priced"] = dict(self.forward_calls.served_calls)
        if self.adapters is not None:
            stats["loras"] = self.adapters.stats()
        if self.graphs is not None:
            stats["cuda_graphs"] = dict(self.graphs.counts)
        if self.background is not None:
            stats["training"] = self.background.stats()
        if self.device.type == "cuda":  # what a long mixed load must keep flat (README, "Metrics")
            stats["gpu_memory_mib"] = {
                "allocated": round(torch.cuda.memory_allocated(self.device) / 2**20, 1),
                "reserved": round(torch.cuda.memory_reserved(self.device) / 2**20, 1),
            }
            stats["cuda_allocator"] = cuda_allocator_counts(torch.cuda.memory_stats(self.device))
        return stats

    # -- the loop (one thread) -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Step while there is work, run a unit of background work when there is none (a
        request arriving meanwhile waits for that unit only), sleep otherwise, until `stop`."""
        self._hold_warm_graphs()
        background = self.background
        while not stop.is_set():
            with self._lock:
                now = time.perf_counter()
                delay = self._idle_delay(now)
                background_in = None if delay is not None else self._background_delay(now)
                if delay != 0.0 and background_in != 0.0:
                    wait = min(x for x in (delay, background_in, 0.5) if x is not None)
                    self._lock.wait(timeout=wait)
                    continue
            if background_in == 0.0:
                background.run_step()
                continue
            if background is not None:
                background.pause()
            self.step()
            self._busy_until = time.perf_counter()

    def _background_delay(self, now: float) -> Optional[float]:
        """With no request in sight: 0 when background work may run a unit now, seconds until it
        may (the idle time it waits for after the last step), None when it has nothing to do."""
        if self.background is None or not self.background.pending():
            return None
        return max(0.0, self._busy_until + self.background.idle_s - now)

    def generate(self, requests: Sequence[GenerationRequest]) -> list:
        """Submit (resolved) requests together and step until all are done, on this thread:
        their outcomes, in order (scripts, tests and benchmarks; a server runs `run`)."""
        controls = [self.submit(request) for request in requests]
        self.run_until_idle()
        return [control.outcome for control in controls]

    def run_until_idle(self) -> None:
        """Step until no request is active or waiting (tests and benchmarks)."""
        self._hold_warm_graphs()
        while True:
            with self._lock:
                delay = self._idle_delay(time.perf_counter())
            if delay is None:
                return
            if delay > 0:
                time.sleep(delay)
            self.step()

    def _hold_warm_graphs(self) -> None:
        """Raise dynamo's `recompile_limit` on this thread to what the warm-up made room for.
        Since torch 2.12 dynamo's settings live in a ContextVar (pytorch/pytorch#186537), so a
        thread sees only what was set on it. An engine warmed up on one thread and stepping on
        another (a replica did until it built its engine on its engine thread; a benchmark's
        `--replica-threads` still does) started there from the default (8), already full of
        warm-up graphs, so a size the warm-up did not run could not compile (a fullgraph compile
        failed the request; `tests/test_optimize.py`)."""
        if self._recompile_limit is not None:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, self._recompile_limit)

    @torch.inference_mode()
    def step(self) -> None:
        self._drop_stopped()
        self._admit()
        for rows in _sharing_groups(self._active):
            self._forward(self._taking_step(rows))
        self._retire()
        self._steps += 1

    # -- the steps ---------------------------------------------------------------------------

    def _idle_delay(self, now: float) -> Optional[float]:
        """0 when a step has work now; seconds until it will (a forming batch); None when idle."""
        if self._active or self._admissible(now):
            return 0.0
        if self._waiting and self.scheduling == "request":
            return max(0.0, self._waiting[0].submitted_at + self.batch_wait_s - now)
        return None if not self._waiting else 0.0

    def _admissible(self, now: float) -> int:
        free = self.max_rows - len(self._active)
        if free <= 0 or not self._waiting:
            return 0
        if self.scheduling == "request":
            if self._active:
                return 0
            window_open = now - self._waiting[0].submitted_at < self.batch_wait_s
            if window_open and len(self._waiting) < self.max_rows:
                return 0
        return min(free, len(self._waiting))

    def _drop_stopped(self) -> None:
        now = time.time()
        stopped = [row for row in self._active if row.control.should_stop(now)]
        with self._lock:
            waiting = [item for item in self._waiting if item.control.should_stop(now)]
            for item in waiting:
                self._waiting.remove(item)
        for row in stopped:
            self._active.remove(row)
            self._release(row)
        for control in [row.control for row in stopped] + [item.control for item in waiting]:
            with self._lock:
                self._stats.count("cancelled" if control.cancelled else "expired")
            control.finish(control.stop_error())

    def _admit(self) -> None:
        with self._lock:
            waiting = self._next_waiting(self._admissible(time.perf_counter()))
        admitted, slots = [], []
        for item in waiting:  # a LoRA that cannot be applied fails its own request only
            try:
                slots.append(self._acquire(item.request))
                admitted.append(item)
            except ServiceError as error:
                self._finish_failed(item.control, error)
        if not admitted:
            return
        into_running = bool(self._active)
        started = time.perf_counter()
        try:
            embeds = self._split_on_oom(list(zip(admitted, slots)), self._encode, "prompt encode")
        except Exception:  # one bad batch of prompts must not stop the loop
            logger.exception("encoding the prompts of %d request(s) failed", len(admitted))
            for item, slot in zip(admitted, slots):
                self._release_slot(slot)
                self._fail(item.control)
            return
        now = time.perf_counter()
        with self._lock:
            self._stats.counts["encode_s"] += now - started
        for item, embed, slot in zip(admitted, embeds, slots):
            if embed is None:  # its prompts alone ran out of GPU memory
                self._release_slot(slot)
                self._fail_oom(item.control)
                continue
            try:
                row = self._rows.prepare(item.request, item.control, embed, item.submitted_at, slot)
            except Exception as error:
                self._release_slot(slot)
                self._fail_raised(item.control, error, f"preparing request {item.request.request_id}")
                continue
            row.due = self._steps + len(row.timesteps)
            self._active.append(row)
            wait_s = now - item.submitted_at
            with self._lock:
                self._stats.admitted(wait_s, into_running)
            self._observer.on_admit(wait_s, into_running)

    def _encode(self, admitted: list[tuple[_Waiting, int]]) -> list[TextEmbeds]:
        """The prompts of admitted requests (each with its LoRA slot) in one text-encoder pass."""
        slots = [slot for _, slot in admitted]
        return self._rows.encode(
            [item.request for item, _ in admitted],
            rows_on_slots(self.adapters, slots, self.device, ("text_encoder", "text_encoder_2")),
        )

    def _next_waiting(self, count: int) -> list[_Waiting]:
        """Takes the `count` waiting requests admitted next (under the lock). The request policy
        takes them in arrival order, as the request-level batching it stands for did. The step
        policy takes the ones due earliest (arrival step + steps; ties in arrival order): with a
        full engine, an 8-step request overtakes 40-step ones that arrived up to 32 steps before
        it (H200, 16 clients, half 8 / half 40 steps, FIFO: the short ones' p50 was 7.0 s, 4.7 s
        of it queueing), and since a waiting request's due step does not move, later arrivals
        stop overtaking it once their own due steps pass it: none waits forever."""
        if self.scheduling == "request":
            return [self._waiting.popleft() for _ in range(count)]
        if not count:  # no room: nothing to choose, no phase to look at
            return []
        ordered = list(self._waiting) if count >= len(self._waiting) else sorted(self._waiting, key=lambda item: item.due)
        opens: dict[tuple[int, int, int], bool] = {}  # one look at the running rows per kind
        in_phase = [self._in_phase(item, opens) for item in ordered]
        self._stats.counts["phase_waits"] += in_phase[:count].count(False)
        taken = [item for item, joins in zip(ordered, in_phase) if joins][:count]
        for item in taken:
            self._waiting.remove(item)
        return taken

    def _in_phase(self, item: _Waiting, opens: dict[tuple[int, int, int], bool]) -> bool:
        """Whether a waiting request may join this step as far as deep caching goes. A row with
        `deep_cache_interval` k takes full steps at its own steps 0, k, 2k, ... and shallow ones
        between, and a full and a shallow step never share a forward: rows of one size that
        joined at different steps split every step into a full and a shallow forward. So a
        request at interval k > 1 joins at a step where the largest group of running rows of its
        size and interval takes a full step (as it will), waiting at most k steps; its image
        is the same, since its own steps are. Over HTTP on an H200 (16 clients, interval 3),
        rows joined as they arrived: 32 requests ran 200 calls, 40 of them full passes of a
        single image besides 40 of 6 images on average (BENCHMARKS.md, "Prices from served
        calls"). `opens` keeps the answer per (interval, width, height) for this step: the
        running rows are counted once per kind, not once per waiting request."""
        request, interval = item.request, item.request.deep_cache_interval
        if interval <= 1 or self._steps - item.arrived >= interval:
            return True
        kind = (interval, request.width, request.height)
        if kind not in opens:
            phases = Counter(
                row.index % interval
                for row in self._active
                if row.request.deep_cache_interval == interval and (row.request.width, row.request.height) == kind[1:]
            )
            opens[kind] = not phases or phases[0] == max(phases.values())
        return opens[kind]

    def _acquire(self, request: GenerationRequest) -> int:
        """The LoRA slot of a request (0: none), resident from here until its row ends."""
        if self._warm_slot is not None:
            return self._warm_slot
        # A refiner stage (a handoff) runs without the request's LoRAs: they were made for the
        # base's UNet and steered its stage (README, "The refiner").
        if not request.loras or request.handoff is not None:
            return 0
        if self.adapters is None:
            raise InvalidRequestError("this deployment serves no LoRAs", param="loras", code="loras_disabled")
        return self.adapters.acquire(request.loras)

    def _release(self, row: Row) -> None:
        self._release_slot(row.slot)

    def _release_slot(self, slot: int) -> None:
        if self.adapters is not None and slot != self._warm_slot:
            self.adapters.release(slot)

    def _taking_step(self, rows: list[Row]) -> list[Row]:
        """The rows of one sharing group that take this step.

        Padding makes a call cost its bucket's price, so once a group's cheapest plan is several
        calls no call is cheaper per row than the first: running them all makes every row wait for
        all of them. Measured on an H200 (compiled, 1024², buckets 1 and 8 images): 46 ms a call of
        one image, 258 ms of eight. Two to five images would take 2-5 calls of one image a step,
        each image finishing 2-5× later than it would alone; so one call runs, taking the rows due
        earliest (shortest work first, and since a waiting row's due step does not move, every row
        is reached), the others wait a step. Without compiled sizes (one call of any size) every
        row takes every step. With a one-row bucket (`unguided_bucket`) the first call may be one
        row, which holds no guided row: then the row due first takes the step alone, as calls of
        one row (else no row would ever step)."""
        calls = self.forward_calls.split(sum(row.unet_rows() for row in rows))
        if len(calls) == 1:
            return rows
        by_due = sorted(rows, key=lambda row: row.due)  # stable: admission order among equals
        taking, room = [], calls[0]
        for row in by_due:
            if row.unet_rows() <= room:
                taking.append(row)
                room -= row.unet_rows()
        taking = taking or by_due[:1]
        with self._lock:
            self._stats.deferred(len(rows) - len(taking))
        return taking

    def _forward(self, rows: list[Row]) -> None:
        started = time.perf_counter()
        clock = self._call_clock
        try:
            noise_preds = self._split_on_oom(
                rows, lambda group: self._unet(group, clock), "UNet forward", self.forward_calls, Row.unet_rows
            )
            if clock is not None:  # the calls the device has finished by now, these or earlier ones
                clock.harvest(self.forward_calls)
        except Exception:
            logger.exception("a UNet forward of %d row(s) failed", len(rows))
            for row in rows:
                self._active.remove(row)
                self._release(row)
                self._fail(row.control)
            return
        stepped = [(row, noise_pred) for row, noise_pred in zip(rows, noise_preds) if noise_pred is not None]
        for row, noise_pred in zip(rows, noise_preds):
            if noise_pred is None:  # alone it ran out of GPU memory
                self._active.remove(row)
                self._release(row)
                self._fail_oom(row.control)
        for row, noise_pred in stepped:
            row.advance(noise_pred)
            row.shared_with = max(row.shared_with, len(stepped))
            row.report()
        seconds = time.perf_counter() - started
        with self._lock:
            self._stats.forwarded(len(stepped), seconds)
        self._observer.on_forward(len(stepped), seconds)

    def _split_on_oom(
        self,
        items: list,
        call: Callable[[list], Sequence],
        what: str,
        planner: Optional[CallPlanner] = None,
        weight: Callable[[Any], int] = lambda item: 1,
    ) -> list:
        """`call(items)`, one result per item; when a call runs out of GPU memory, its items run
        again as smaller calls, down to one item. Returns each item's result, or None for an item
        that ran out of memory alone (its request fails with a 503 `out_of_memory`, which a client
        may retry or shrink; the other items go on). The one place OOM is split and retried, for
        the UNet forward, the VAE decode and the prompt encode.

        Why: memory grows with a call's rows, and a replica near its card's limit (a large image,
        fragmentation, another process on the GPU) should fall back to smaller calls, not fail
        every request of a step, nor die. A failed call left its items untouched (a row advances
        only after its forward returns), so the retry runs the same inputs and gives the same
        results (up to float sums in another order). The failed call's tensors are dropped (the
        error with its frames is gone before the retry) and CUDA's cached blocks released.

        Smaller calls (`_smaller_calls`): without compiled sizes, the two halves; with them
        (`planner`'s buckets), calls of at most the bucket below the one that failed, since a half
        padded back up to the same bucket would need the same memory; every call still runs at a
        bucket size (with buckets [1, 2, 4, 8] images, a failed UNet call of 16 rows retries as calls
        of 8, then 4, then 2). `weight`: an item's size in the planner's units (a guided row is two
        UNet rows; an item is never split). Logs one line per forward (or decode, or encode) that
        ran out of memory, however often it was split; no traceback."""
        weights = [weight(item) for item in items]
        results: list = [None] * len(items)
        pending, ran, splits, failed = [list(range(len(items)))], [], 0, 0
        while pending:
            group = pending.pop(0)
            try:
                outputs = list(call([items[index] for index in group]))
            except torch.OutOfMemoryError:
                outputs = None  # handled below, once the error and the failed call's frames are gone
            if outputs is not None:
                for index, output in zip(group, outputs):
                    results[index] = output
                ran.append(len(group))
                continue
            _free_gpu_memory()
            smaller = _smaller_calls(group, weights, planner)
            splits += bool(smaller)
            failed += 0 if smaller else len(group)
            pending[:0] = smaller
        if splits or failed:
            with self._lock:
                self._stats.counts["oom_splits"] += splits
            logger.warning(
                "a %s of %d request(s) ran out of GPU memory: ran as calls of %s request(s) after %d split(s); "
                "%d failed alone (503 out_of_memory)",
                what, len(items), ran, splits, failed,
            )
        return results

    def _unet(self, rows: list[Row], clock: Optional[CallClock] = None) -> list[torch.Tensor]:
        """One forward over every row (two UNet rows per image at a guided step), run as the
        planned calls of compiled sizes; returns each row's noise prediction rows. `clock` times
        the full calls (a shallow call costs a fraction of one of the same size; a ControlNet
        deployment's calls are all steered, so theirs are the prices it needs). The rows of a
        group reusing deep features run the UNet's shallow branch (`sharing.forward_key`). With
        `deep_cache`, every full forward runs its full pass, the UNet's own prediction plus the
        deep features, which are stored on the rows that cache them: one compiled graph per
        shape serves both kinds of row (a deployment compiles the full pass instead of the UNet,
        not besides it)."""
        reuse = rows[0].reuses_deep
        keep = self.deep_cache is not None and not reuse and any(row.caches_deep for row in rows)
        # Contiguous whatever the rows' layouts: an img2img or hires row's latents come from the
        # VAE encoder in channels-last strides (diffusers' image tensor is a permuted HWC array),
        # and a compiled UNet guards on strides, so such a row recompiled a warmed graph.
        inputs = torch.cat([row.model_input() for row in rows]).contiguous()
        timesteps = torch.cat(
            [row.timestep.to(torch.float32).reshape(1).repeat(row.unet_rows()) for row in rows]
        ).to(inputs.device)
        prompt, pooled, time_ids = (torch.cat(part) for part in zip(*(row.conditioning() for row in rows)))
        deep = torch.cat([row.deep_features() for row in rows]) if reuse else None
        slots = [row.slot for row in rows for _ in range(row.unet_rows())]
        steered = [steering for row in rows for steering in row.steering()]
        outputs, kept, start = [], [], 0
        for size in self.forward_calls.split(inputs.shape[0]):
            end, padded = start + size, self.forward_calls.padded(size)
            call_slots = slots[start:end] + slots[end - 1 : end] * (padded - size)
            call_inputs, call_timesteps, call_prompt = (
                _pad(tensor[start:end], padded) for tensor in (inputs, timesteps, prompt)
            )
            added = {"text_embeds": _pad(pooled[start:end], padded), "time_ids": _pad(time_ids[start:end], padded)}
            call_steered = steered[start:end] + steered[end - 1 : end] * (padded - size)
            call_deep = _pad(deep[start:end], padded) if reuse else None
            priced = clock is not None and not reuse
            # A graph replays what it captured: only calls that read nothing but their tensors.
            graphed = self.graphs is not None and self.graphs.takes(padded) and not any(call_slots) and not any(call_steered)
            with rows_on_slots(self.adapters, call_slots, inputs.device, ("unet",)), (
                clock.timing(padded) if priced else nullcontext()
            ):
                if graphed:
                    output, features = self.graphs.run(
                        lambda sample, timesteps, prompt, added, deep: self._unet_call(
                            sample, timesteps, prompt, added, call_steered, deep
                        ),
                        call_inputs, call_timesteps, call_prompt, added, call_deep,
                    )
                else:
                    output, features = self._unet_call(call_inputs, call_timesteps, call_prompt, added, call_steered, call_deep)
            outputs.append(output[:size])
            if keep:
                kept.append(features[:size])
            with self._lock:
                self._stats.unet_call(size, padded, shallow=reuse)
            start = end
        split = [row.unet_rows() for row in rows]
        if keep:
            for row, features in zip(rows, torch.cat(kept).split(split)):
                if row.caches_deep:
                    row.deep = features
        return list(torch.cat(outputs).split(split))

    def _unet_call(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        prompt: torch.Tensor,
        added: dict[str, torch.Tensor],
        steered: list,
        deep: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One call of a compiled size: its noise predictions, and the deep features when the
        deep-cache full pass ran. Given kept `deep` features, the shallow pass (deep-cache rows are
        never steered: the request refuses controlnets); else the ControlNets' residuals of the
        `steered` rows go into the full pass (with `deep_cache`) or the UNet."""
        if deep is not None:
            return self.deep_cache.shallow(sample, timesteps, prompt, added, deep), None
        control = residuals(self.controlnets, steered, sample, timesteps, prompt, added) or {}
        if self.deep_cache is not None:
            return self.deep_cache.full(sample, timesteps, prompt, added, **control)
        output = self._pipe.unet(
            sample, timesteps, encoder_hidden_states=prompt, added_cond_kwargs=added, return_dict=False, **control
        )[0]
        return output, None

    def _retire(self) -> None:
        """The rows that finished leave the batch:
        1. their LoRA slots are released (a hires first pass hands its slot to its second pass);
        2. hires first passes with the latent upscaler become their second passes;
        3. refined requests' base stages are answered with their latents (no decode);
        4. the rest are decoded, one VAE pass per shape: their callers get the images, and hires
           first passes with the Lanczos upscaler become their second passes."""
        finished = [row for row in self._active if row.done]
        if not finished:
            return
        self._active = [row for row in self._active if not row.done]
        for row in finished:
            if not row.upscales:
                self._release(row)
        for row in finished:
            if row.upscales_latents:
                self._start_hires(row)
        for row in finished:
            if row.hands_off:
                self._finish(row, LatentsOutput(
                    latents=row.latents[0].float().cpu().numpy(),
                    generator_state=row.generator.get_state().numpy(),
                    steps=len(row.timesteps),
                    **self._output_fields(row, time.perf_counter()),
                ))
        for rows in _shape_groups([row for row in finished if not (row.hands_off or row.upscales_latents)]):
            try:
                images = self._split_on_oom(rows, self._decode_rows, "VAE decode", self.decode_calls)
                pixels = [
                    None if image is None or row.upscales else to_pixels(self._pipe, row, image)
                    for row, image in zip(rows, images)
                ]
            except Exception:
                logger.exception("decoding %d image(s) failed", len(rows))
                for row in rows:
                    self._release_if_upscaling(row)
                    self._fail(row.control)
                continue
            done_at = time.perf_counter()
            for row, image, pixel in zip(rows, images, pixels):
                if image is None:  # alone it ran out of GPU memory
                    self._release_if_upscaling(row)
                    self._fail_oom(row.control)
                elif row.upscales:
                    self._start_hires(row, image)
                else:
                    self._finish(row, RunOutput(image=pixel, **self._output_fields(row, done_at)))

    def _start_hires(self, first: Row, image: Optional[torch.Tensor] = None) -> None:
        """Replace a hires request's finished first pass with its second pass, active from the
        next step (it keeps the first pass's place: no admission, no text encoding)."""
        hires = first.request.hires
        try:
            with vae_tiling(self._pipe.vae, hires.width * hires.height, self.vae_tiling_above):
                row = self._rows.prepare_hires(first, image)
        except Exception as error:
            self._release_if_upscaling(first)
            self._fail_raised(first.control, error, f"preparing the hires pass of request {first.request.request_id}")
            return
        row.admitted_at, row.due, row.shared_with = first.admitted_at, self._steps + len(row.timesteps), first.shared_with
        self._active.append(row)

    def _release_if_upscaling(self, row: Row) -> None:
        """A hires first pass that ends without a second pass gives its LoRA slot back here."""
        if row.upscales:
            self._release(row)

    @staticmethod
    def _output_fields(row: Row, done_at: float) -> dict[str, Any]:
        return {
            "seed": row.request.seed,
            "batch_size": row.shared_with,
            "queue_s": row.admitted_at - row.submitted_at,
            "run_s": done_at - row.admitted_at,
        }

    def _finish(self, row: Row, outcome: Any) -> None:
        with self._lock:
            self._stats.count("completed")
        row.control.finish(outcome)

    def _decode_rows(self, rows: list[Row]) -> list[torch.Tensor]:
        return list(self._decode(torch.cat([row.latents for row in rows])))

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        images, start = [], 0
        pixels = latents.shape[-2] * latents.shape[-1] * self._pipe.vae_scale_factor**2
        try:
            with vae_tiling(self._pipe.vae, pixels, self.vae_tiling_above):
                for size in self.decode_calls.split(latents.shape[0]):
                    end = start + size
                    images.append(decode(self._pipe, _pad(latents[start:end], self.decode_calls.padded(size)))[:size])
                    start = end
        finally:
            self._restore_vae()
        return torch.cat(images)

    def _restore_vae(self) -> None:
        """An fp16 VAE that asks for it (`force_upcast`) runs in float32 for each decode
        (`rows.decode`) and encode (diffusers' `prepare_latents`) and is cast back after: a call
        that raised (out of memory) left it in float32, where the next decode would get float16
        latents and fail, every time. Back to the dtype it was loaded in."""
        if self._pipe.vae.dtype != self._vae_dtype:
            self._pipe.vae.to(dtype=self._vae_dtype)

    def _fail(self, control: RequestControl) -> None:
        self._finish_failed(control, EngineError("image generation failed on the engine", code="engine_error"))

    def _fail_oom(self, control: RequestControl) -> None:
        """A request whose work alone ran out of GPU memory: a 503 the client may retry later, or
        with a smaller image."""
        with self._lock:
            self._stats.counts["oom_failures"] += 1
        self._finish_failed(control, OverloadedError(
            "the request is too large for this GPU right now (it ran out of memory alone); retry later or ask for a "
            "smaller image",
            code="out_of_memory",
        ))

    def _fail_raised(self, control: RequestControl, error: Exception, doing: str) -> None:
        """A request whose own work (not shared with others) raised `error`: a typed service
        error keeps its status (a 400 found while preparing is the client's), out of GPU memory
        is a 503 and one log line, anything else a 500 and its traceback."""
        self._restore_vae()
        if isinstance(error, ServiceError):
            logger.info("%s refused: %s", doing, error)
            self._finish_failed(control, error)
        elif isinstance(error, torch.OutOfMemoryError):
            logger.warning("%s ran out of GPU memory (503 out_of_memory)", doing)
            self._fail_oom(control)
        else:
            logger.error("%s failed", doing, exc_info=error)
            self._fail(control)

    def _finish_failed(self, control: RequestControl, error: ServiceError) -> None:
        with self._lock:
            self._stats.count("failed")
        control.finish(error)

    # -- warm-up --------------------------------------------------------------------------------

    def warmup(self, request: GenerationRequest, image_sizes: Sequence[tuple[int, int]] = ()) -> None:
        """Compile (or load from the compile cache) every bucket before serving: run `request`
        at each image bucket size to completion (and unguided at one image, with
        `unguided_bucket`), and again at each of `image_sizes` (width, height), then time one UNet
        call and one decode per bucket at `request`'s size, the costs forwards and decodes are
        split by."""
        sizes = self.decode_calls.buckets or [1]
        # Each latent shape is a graph of its own (a hires pass's 2048² as much as a plain
        # request's), and so is each branch a forward can take: plain; steered (residuals passed
        # to the UNet, every hosted ControlNet on a blank map); with `deep_cache`, its shallow
        # pass (unsteered: a deep-cache request has no ControlNet); and each of them with the LoRA
        # slot layers' other branch (on a slot of zeros: the base image). All are compiled now,
        # not on the first request that takes them.
        requests = [request]
        requests += [request.model_copy(update={"width": w, "height": h}) for w, h in image_sizes]
        if self.controlnets:
            requests += [self._steered_by_every_controlnet(plain) for plain in list(requests)]
        if self.deep_cache is not None:  # the shallow pass (every full forward is the full pass already)
            requests += [plain.model_copy(update={"deep_cache_interval": 2}) for plain in list(requests) if not plain.controlnets]
        graphs_per_bucket = len(requests) * (2 if self.adapters is not None else 1)  # shapes × branches
        needed = _recompile_limit_for(graphs_per_bucket * len(self.forward_calls.buckets or [1]), (self._pipe.unet, self._pipe.vae))
        self._recompile_limit = max(self._recompile_limit or 0, needed)
        self._warm_branches(requests, sizes)
        if self.adapters is not None:
            with self.adapters.zero_slot() as slot:
                self._warm_slot = slot
                try:
                    self._warm_branches(requests, sizes)
                finally:
                    self._warm_slot = None
        if self.graphs is not None:
            # A graphed shape captures its graph at its second call: the smallest bucket's
            # branches once more, so that no served request pays for a capture.
            self._warm_branches(requests, sizes[:1])
        if self.decode_calls.buckets:
            # A hypothesis, not yet verified: in 2 of 4 GPU runs the replica that had just compiled
            # from an empty cache timed (and in one, served) 16-row calls at 407-435 ms where
            # replicas that loaded the same graphs from the cache took 258-267 ms, while its 2-row
            # calls were normal. Compiling allocates and frees in odd sizes; handing the cached
            # blocks back gives the timed and served calls unfragmented memory
            # (BENCHMARKS.md, "fourth run").
            _release_cached_memory(self._pipe.device)
            self.time_buckets(request)
            logger.info(
                "seconds per call by bucket: UNet %s, decode %s",
                {k: round(v, 4) for k, v in self.forward_calls.costs.items()},
                {k: round(v, 4) for k, v in self.decode_calls.costs.items()},
            )
        with self._lock:
            self._stats = _Stats()

    def _steered_by_every_controlnet(self, request: GenerationRequest) -> GenerationRequest:
        blank = np.zeros((request.height, request.width, 3), dtype=np.uint8)
        return request.model_copy(update={"controlnets": tuple(ControlRef(name=name, image=blank) for name in self.controlnets)})

    def _warm_branches(self, requests: list[GenerationRequest], sizes: Sequence[int]) -> None:
        """Each request at each image bucket; with `unguided_bucket`, also alone and unguided:
        its one UNet row is the one-row graph, which no guided request runs."""
        for warm in requests:
            for size in sizes:
                self._warm(warm, size)
            if self.unguided_bucket:
                self._warm(_unguided(warm), 1)

    def _warm(self, request: GenerationRequest, size: int) -> None:
        """Run `request` as `size` images at once; a failure fails the warm-up: a replica whose
        compiled graph cannot run (a fullgraph break, a recompile limit, out of memory at a bucket)
        must not report healthy and fail requests that take that branch."""
        outcomes = self.generate([request.model_copy(update={"request_id": f"warmup-{size}-{index}"}) for index in range(size)])
        failed = next((outcome for outcome in outcomes if isinstance(outcome, ServiceError)), None)
        if failed is not None:
            raise RuntimeError(
                f"warm-up failed running {size} image(s) of {request.width}x{request.height} "
                f"(guidance {request.guidance_scale}, controlnets {len(request.controlnets)}): {failed.message}"
            )

    @torch.inference_mode()
    def time_buckets(self, request: GenerationRequest) -> None:
        """Measure the cost of one UNet call and one decode per bucket at `request`'s size (the
        warm-up's last part; a benchmark that compiles its buckets itself calls it to plan calls
        as a served replica does). Rounds of `_TIMED_CALLS` calls per bucket until they settle
        (`settled_rounds`; the least is the bucket's cost): one call's time is not enough to plan
        a replica's life on (H200, compiled, 16 UNet rows: one timing each gave 267 ms on one
        replica and 441 ms on the next, and the second batched only from 8 images instead of 6).
        From here on the UNet calls served re-price their buckets (`CallPlanner.observed`)."""
        rows_by_size, row = self._bucket_rows(request)
        device = row.latents.device
        for size, rows in rows_by_size.items():
            self.forward_calls.timed(size, settled_rounds(lambda: _median_seconds(lambda: self._unet(rows), device)))
        for size in self.decode_calls.buckets:
            latents = row.latents.repeat(size, 1, 1, 1)
            self.decode_calls.timed(size, settled_rounds(lambda: _median_seconds(lambda: decode(self._pipe, latents), device)))
        self._call_clock = CallClock(device)

    @torch.inference_mode()
    def profile_buckets(self, request: GenerationRequest) -> dict[int, dict[str, Any]]:
        """One UNet call per bucket at `request`'s size under the profiler
        (`profiling.profile_call`): where each call's time goes, by UNet rows."""
        rows_by_size, row = self._bucket_rows(request)
        return {size: profile_call(lambda: self._unet(rows), row.latents.device) for size, rows in rows_by_size.items()}

    def _bucket_rows(self, request: GenerationRequest) -> tuple[dict[int, list[Row]], Row]:
        """Rows of `request` filling each UNet bucket (by its UNet rows), and one guided row."""
        requests = [request, _unguided(request)]
        row, unguided = (
            self._rows.prepare(each, RequestControl(), embeds, time.perf_counter())
            for each, embeds in zip(requests, self._rows.encode(requests))
        )
        rows_by_size = {}
        for size in self.forward_calls.buckets or []:
            # A guided row fills even buckets only: the one-row bucket is filled with an unguided row.
            filling = row if size % row.unet_rows() == 0 else unguided
            rows_by_size[size] = [filling] * (size // filling.unet_rows())
        return rows_by_size, row


class _Stats:
    """Counters and recent series behind `StepEngine.stats()` (updated under the engine's lock)."""

    def __init__(self):
        self.counts = {
            "admitted": 0, "admitted_into_running": 0, "completed": 0, "cancelled": 0, "expired": 0,
            "failed": 0, "forwards": 0, "row_steps": 0, "deferred_row_steps": 0, "unet_calls": 0, "shallow_unet_calls": 0, "unet_rows": 0,
            "padded_unet_rows": 0, "forward_s": 0.0, "oom_splits": 0, "oom_failures": 0,
            # Seconds in the admitted prompts' text-encoder passes (host time; part of `queue_s`).
            "encode_s": 0.0,
            # Steps that waiting deep-cache requests waited to join in phase (`_in_phase`).
            "phase_waits": 0,
        }
        self.rows_per_forward: deque[int] = deque(maxlen=_RECENT)
        self.queue_wait_s: deque[float] = deque(maxlen=_RECENT)
        self._steps: deque[tuple[float, int]] = deque(maxlen=_RECENT)

    def count(self, name: str) -> None:
        self.counts[name] += 1

    def admitted(self, wait_s: float, into_running: bool) -> None:
        self.counts["admitted"] += 1
        self.counts["admitted_into_running"] += into_running
        self.queue_wait_s.append(round(wait_s, 4))

    def forwarded(self, rows: int, seconds: float) -> None:
        self.counts["forwards"] += 1
        self.counts["row_steps"] += rows
        self.counts["forward_s"] += seconds
        self.rows_per_forward.append(rows)
        self._steps.append((time.perf_counter(), rows))

    def deferred(self, rows: int) -> None:
        self.counts["deferred_row_steps"] += rows

    def unet_call(self, rows: int, padded: int, shallow: bool) -> None:
        self.counts["unet_calls"] += 1
        self.counts["shallow_unet_calls"] += shallow
        self.counts["unet_rows"] += rows
        self.counts["padded_unet_rows"] += padded - rows

    def snapshot(self) -> dict[str, Any]:
        now = time.perf_counter()
        recent = [rows for at, rows in self._steps if now - at <= _RATE_WINDOW_S]
        return {
            **self.counts,
            "forward_s": round(self.counts["forward_s"], 4),
            "encode_s": round(self.counts["encode_s"], 4),
            "rows_per_forward": list(self.rows_per_forward),
            "queue_wait_s": list(self.queue_wait_s),
            "row_steps_per_s": round(sum(recent) / _RATE_WINDOW_S, 3),
        }


def _sharing_groups(rows: list[Row]) -> list[list[Row]]:
    """`rows` split by what may share this step's forward (`sharing.forward_key`)."""
    return _groups(rows, lambda row: forward_key(tuple(row.latents.shape), row.reuses_deep))


def _shape_groups(rows: list[Row]) -> list[list[Row]]:
    """`rows` split by latent shape: what may share a VAE decode."""
    return _groups(rows, lambda row: tuple(row.latents.shape))


def _groups(rows: list[Row], key: Callable[[Row], Any]) -> list[list[Row]]:
    """`rows` split by `key`, in order of first row."""
    groups: dict[Any, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return list(groups.values())


def _recompile_limit_for(graphs: int, models: Sequence[torch.nn.Module]) -> int:
    """Dynamo keeps at most `recompile_limit` graphs per code object (8 by default); past it a
    frame runs eager, silently, and a regional or block (fullgraph) compile fails the call instead.
    The warm-up compiles `graphs` UNet graphs, one per latent shape, UNet bucket and branch (12 with
    buckets [1, 8], the unguided bucket, LoRA slots and one of `warmup_sizes`; the VAE decoder's are
    fewer). A compiled module's graphs sit on its class's `forward`, shared by every compiled
    instance of the class in `models`, and each instance may need its own (SDXL's ResNet blocks
    differ in shape; its 70 transformer blocks have two widths): the limit makes room for a graph
    per instance and warm-up graph, plus dynamo's default for a size the warm-up did not run (which
    compiles on its first request, as it would on a replica warmed with fewer graphs). A cap, not a
    cost: guards are checked only against graphs that exist."""
    compiled = Counter(
        type(module).forward for model in models for module in model.modules() if module._compiled_call_impl is not None
    )
    instances = max(compiled.values(), default=1)
    return graphs * instances + _UNWARMED_GRAPHS


def _unet_buckets(buckets: Optional[Sequence[int]], unguided_bucket: bool) -> Optional[list[int]]:
    """The UNet-row sizes compiled graphs exist for: twice the image `buckets` (a guided image is
    two UNet rows), and one row with `unguided_bucket` (a lone row with guidance ≤ 1 would pad to two)."""
    if not buckets:
        if unguided_bucket:
            raise ValueError("unguided_bucket needs buckets")
        return None
    return ([1] if unguided_bucket else []) + [2 * size for size in buckets]


def _smaller_calls(group: list[int], weights: list[int], planner: Optional[CallPlanner]) -> list[list[int]]:
    """The calls the items `group` (indexes into `weights`) run as after their call ran out of
    memory, in order; none when no smaller call exists: one item, or, with buckets, a call that
    failed at the smallest bucket (each of its items would run at that size alone too)."""
    if len(group) == 1:
        return []
    if planner is None or not planner.buckets:
        half = (len(group) + 1) // 2
        return [group[:half], group[half:]]
    failed_at = max(planner.padded(size) for size in planner.split(sum(weights[index] for index in group)))
    below = [bucket for bucket in planner.buckets if bucket < failed_at]
    if not below:
        return []
    calls: list[list[int]] = [[]]
    room = below[-1]
    for index in group:  # consecutive items, each call within the bucket below (its plan pads no higher)
        if calls[-1] and weights[index] > room:
            calls.append([])
            room = below[-1]
        calls[-1].append(index)
        room -= weights[index]
    return calls


def _free_gpu_memory() -> None:
    """Hand CUDA's cached blocks back after an out-of-memory error (the failed call's tensors are
    unreferenced by now), so the retry and other processes on the card find them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pad(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` with copies of its last row appended up to `size` rows (outputs are dropped)."""
    missing = size - tensor.shape[0]
    return tensor if missing <= 0 else torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def settled_rounds(timed_round: Callable[[], float]) -> list[float]:
    """`timed_round()`'s values, round after round until the last two of at least
    `_TIMING_MIN_ROUNDS` agree within `_TIMING_AGREEMENT`, or `_TIMING_ROUNDS` were taken."""
    rounds = [timed_round() for _ in range(_TIMING_MIN_ROUNDS)]
    while len(rounds) < _TIMING_ROUNDS and abs(rounds[-1] - rounds[-2]) > _TIMING_AGREEMENT * min(rounds[-2:]):
        rounds.append(timed_round())
    return rounds


def _median_seconds(call, device: torch.device) -> float:
    times = []
    for _ in range(_TIMED_CALLS):
        started = time.perf_counter()
        call()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unguided(request: GenerationRequest) -> GenerationRequest:
    """`request` without classifier-free guidance: one UNet row a step."""
    return request.model_copy(update={"guidance_scale": 1.0})


def cuda_allocator_counts(memory_stats: Mapping[str, Any]) -> dict[str, int]:
    """The caching allocator's calls to the driver since the process started (from
    `torch.cuda.memory_stats`): `cudaMalloc`s, `cudaFree`s, and retries, each of which frees
    cached blocks and synchronizes the device before allocating again. Steady serving should add
    none; a replica that keeps adding them is paying for fragmented memory in every step (one
    suspect for replicas whose 16-row calls ran ~2x slower than the same engine in a plain
    process: BENCHMARKS.md, "Deep caching as a deployment's default")."""
    names = {"device_allocs": "num_device_alloc", "device_frees": "num_device_free", "alloc_retries": "num_alloc_retries"}
    return {name: int(memory_stats.get(key, 0)) for name, key in names.items()}


def _is_resolved(request: GenerationRequest) -> bool:
    settings = (
        request.width, request.height, request.num_inference_steps, request.scheduler, request.guidance_scale,
        request.deep_cache_interval, request.seed,
    )
    return None not in settings and (request.kind == "txt2img" or request.strength is not None)
