"""What a caller holds of a request in flight, shared between its thread and the engine's.

The serving side calls `cancel()` from any thread; the engine reads `should_stop` before every
step, reports progress through `on_progress(step, total)` and ends the request exactly once with
`finish(outcome)`: a `RunOutput` or the `ServiceError` it ended with.
"""

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from deployments.types import DeadlineExceededError, RequestCancelledError, ServiceError


@dataclass
class RunOutput:
    """One request's image as float pixels in [0, 1], shape (H, W, 3), before any encoding."""

    image: np.ndarray
    seed: int
    #: The most requests that shared one UNet forward with this one.
    batch_size: int
    #: Seconds from submission to admission (`queue_s`) and from admission to the image (`run_s`).
    queue_s: float
    run_s: float


@dataclass
class LatentsOutput:
    """The base stage of a refined request: its final latents (1, C, h, w) and its generator's
    state, for the refiner stage (`deployments.types.Handoff`)."""

    latents: np.ndarray
    generator_state: np.ndarray
    #: Denoising steps the row ran.
    steps: int
    seed: int
    batch_size: int
    queue_s: float
    run_s: float


Outcome = Union[RunOutput, LatentsOutput, ServiceError]


class RequestControl:
    """Cancel flag, deadline, progress and outcome of one request."""

    def __init__(
        self,
        deadline: Optional[float] = None,
        on_progress: Optional[Callable[[int, int], None]] = None,
        on_done: Optional[Callable[[Outcome], None]] = None,
    ):
        self.deadline = deadline
        self._on_progress = on_progress
        self._on_done = on_done
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self.outcome: Optional[Outcome] = None
        self.step = 0
        self.total = 0

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: Optional[float] = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) >= self.deadline

    def should_stop(self, now: Optional[float] = None) -> bool:
        return self.cancelled or self.expired(now)

    def stop_error(self) -> ServiceError:
        """The error to answer for a request this control stopped."""
        if self.cancelled:
            return RequestCancelledError("the request was cancelled", code="cancelled")
        return DeadlineExceededError("the request passed its deadline", code="deadline_exceeded")

    def report(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        if self._on_progress is not None:
            self._on_progress(step, total)

    def finish(self, outcome: Outcome) -> None:
        """End the request (once; later calls are ignored)."""
        if self._finished.is_set():
            return
        self.outcome = outcome
        self._finished.set()
        if self._on_done is not None:
            self._on_done(outcome)

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: Optional[float] = None) -> Optional[Outcome]:
        """Block until finished (tests and scripts; the replica awaits `on_done` instead)."""
        self._finished.wait(timeout)
        return self.outcome
