"""How long the interpreter stops for its cyclic garbage collector, process-wide.

Every thread waits while a collection runs, the engine's thread (which launches the GPU's kernels)
included, so in a replica whose GPU idles while its host works these pauses are one suspect the
engine's stats make visible. A full (generation 2) collection visits every tracked object, and
after a compiled warm-up those are counted in millions (dynamo's graphs, guards and FX nodes: ~1
M on the H200, a collection of them 0.5-0.7 s). Measured there under a 16-client load, a
compiled replica made no full collection (BENCHMARKS.md, "Warm-up timing"), so nothing freezes
them (`gc.freeze`) today; these counts say when that changes.
"""

import gc
import threading
import time
from typing import Any, Optional

_OLDEST = 2


class GcPauses:
    """Counts collections and the seconds they took, by generation, from `gc.callbacks`.
    `installed()` returns the process's one recorder (callbacks are process-wide)."""

    _installed: Optional["GcPauses"] = None
    _install_lock = threading.Lock()

    def __init__(self):
        self._started: Optional[float] = None
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest_s = 0.0

    @classmethod
    def installed(cls) -> "GcPauses":
        with cls._install_lock:
            if cls._installed is None:
                cls._installed = cls()
                gc.callbacks.append(cls._installed._on_collection)
            return cls._installed

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # A collection runs under the GIL, one at a time: no lock needed between start and stop.
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            seconds = time.perf_counter() - self._started
            self._started = None
            generation = min(info["generation"], _OLDEST)
            self.collections[generation] += 1
            self.seconds[generation] += seconds
            self.longest_s = max(self.longest_s, seconds)

    def snapshot(self) -> dict[str, Any]:
        return {
            "collections": sum(self.collections),
            "full_collections": self.collections[_OLDEST],
            "seconds": round(sum(self.seconds), 4),
            "full_seconds": round(self.seconds[_OLDEST], 4),
            "longest_s": round(self.longest_s, 4),
            "frozen_objects": gc.get_freeze_count(),
        }
