"""Small UNet calls replayed from CUDA graphs (`optimize.cuda_graphs`).

A lone request's UNet calls are small: at 1024² a guided image's call is 2 rows, which the H200
runs in ~0.041 s when the host is ahead of it (queued behind 16-row calls under load), while the
same calls served alone took 0.057–0.088 s by CUDA events (regional compile, BENCHMARKS.md
"Prices from served calls"): alone, the device waits on the host launching the compiled blocks'
kernels and the eager glue between them one by one. A CUDA graph launches a whole call at once:
over HTTP on that card a lone request's 30 UNet calls took 0.46 s with graphs against 0.67-0.99 s
without, and the request 0.75-0.83 s against 0.84-1.35 s (BENCHMARKS.md, seventeenth session).

A call shape's first call runs as it is (it may compile), its second captures a graph (after one
run on a side stream, as `torch.cuda.graphs` asks), and every later one copies its inputs into the
graph's, replays it and copies the outputs out. Graphs are only for calls that read nothing but
their tensor arguments: the engine sends no call with a LoRA slot or a ControlNet here. Knows
torch only.
"""

import logging
from typing import Any, Callable, Optional

import torch
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)

#: `capture(run)` records the device work of `run()` and returns (replay, outputs): `replay()`
#: runs that work again, reading the tensors `run` read and writing `outputs` in place.
Capture = Callable[[Callable[[], Any]], tuple[Callable[[], None], Any]]


def cuda_capture(device: torch.device) -> Capture:
    """The real capture on `device` (a CUDA device), its graphs sharing one memory pool. Sharing is
    safe here: graphs replay one at a time on one stream and every replay's outputs are copied
    out before another graph runs (a later graph may reuse what an earlier one freed, including
    the memory of the earlier one's outputs once those were read)."""
    if device.type != "cuda":
        raise ValueError(f"optimize.cuda_graphs needs a CUDA device (device is {device})")
    pool = torch.cuda.graph_pool_handle()

    def capture(run: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = run()
        return graph.replay, outputs

    return capture


class _Graph:
    def __init__(self, inputs: list[torch.Tensor], replay: Callable[[], None], outputs: Any):
        self.inputs, self.replay, self.outputs = inputs, replay, outputs


class GraphedCalls:
    """Calls of at most `max_rows` UNet rows, each shape replayed from a graph of its own."""

    def __init__(self, max_rows: int, capture: Capture):
        self.max_rows = max_rows
        self._capture = capture
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: set[tuple] = set()
        self._failed: set[tuple] = set()
        self.counts = {"captures": 0, "replays": 0, "capture_failures": 0}

    def takes(self, rows: int) -> bool:
        return rows <= self.max_rows

    def run(self, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)`, replayed from this shape's graph once it has one. `args` (and what
        `call` returns) are tensors, tuples and dicts of them, and Nones; a shape is every
        tensor's shape, dtype and strides, in order, and where the Nones are."""
        leaves, spec = pytree.tree_flatten(args)
        key = (str(spec), tuple(_layout(leaf) for leaf in leaves))
        graph = self._graphs.get(key)
        if graph is None:
            if key in self._failed or key not in self._seen:
                self._seen.add(key)
                return call(*args)
            graph = self._record(key, call, leaves, spec)
            if graph is None:
                return call(*args)
        for static, leaf in zip(graph.inputs, leaves):
            if leaf is not None:
                static.copy_(leaf)
        graph.replay()
        self.counts["replays"] += 1
        return pytree.tree_map(_copy, graph.outputs)

    def _record(self, key: tuple, call: Callable[..., Any], leaves: list[torch.Tensor], spec: Any) -> Optional[_Graph]:
        # Inputs live outside the graphs' pool, for as long as the graph: every replay reads them.
        inputs = [_copy(leaf) for leaf in leaves]
        static_args = pytree.tree_unflatten(inputs, spec)
        try:
            replay, outputs = self._capture(lambda: call(*static_args))
        except Exception:  # the call does something a graph cannot hold: it runs as it is
            logger.warning("capturing a CUDA graph of a UNet call %s failed; it runs without one", key[1], exc_info=True)
            self._failed.add(key)
            self.counts["capture_failures"] += 1
            return None
        self.counts["captures"] += 1
        graph = self._graphs[key] = _Graph(inputs, replay, outputs)
        return graph


def _layout(leaf: Optional[torch.Tensor]) -> Optional[tuple]:
    """What a graph is fixed to: shape, dtype and strides (None: an argument not given)."""
    return None if leaf is None else (tuple(leaf.shape), leaf.dtype, leaf.stride())


def _copy(leaf: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if leaf is None else leaf.clone()
