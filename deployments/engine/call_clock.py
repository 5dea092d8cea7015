"""How long served UNet calls take, measured without waiting for them.

The engine loop never synchronizes the device between steps, so a call's time is read from a pair
of CUDA events around it, once the device has passed the second (`harvest`, at the next forward).
The elapsed time between them is the call's cost to the stream: its kernels, plus any gap in which
the device waited for the host to launch them. On the CPU every op runs when it is called, so the
host's clock is the call's time.
"""

import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from deployments.engine.calls import CallPlanner


class CallClock:
    """Times calls by bucket and hands each finished timing to a planner (`CallPlanner.observed`)."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        # (bucket, start, end): events the device has not necessarily reached yet, oldest first.
        self._pending: deque[tuple[int, Any, Any]] = deque()
        self._finished: list[tuple[int, float]] = []

    @contextmanager
    def timing(self, bucket: int) -> Iterator[None]:
        """Time the call run inside; a call that raises (out of memory) is not timed."""
        if not self._cuda:
            started = time.perf_counter()
            yield
            self._finished.append((bucket, time.perf_counter() - started))
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((bucket, start, end))

    def harvest(self, planner: CallPlanner) -> None:
        """Give `planner` every call the device has finished, oldest first; never waits."""
        while self._pending and self._pending[0][2].query():
            bucket, start, end = self._pending.popleft()
            self._finished.append((bucket, start.elapsed_time(end) / 1000))
        for bucket, seconds in self._finished:
            planner.observed(bucket, seconds)
        self._finished.clear()
