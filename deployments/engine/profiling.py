"""One call under `torch.profiler`, summarised: where its time went, on the host and the device.

A compiled Serve replica timed its 16-row UNet call at ~0.5 s where the same engine in a plain
process took 0.28 s, while its 2-row calls matched (BENCHMARKS.md, "Warm-up timing"). Profiled,
the call ran the same kernels at the same speed in both ("Prices from served calls"): the
timing was wrong, not the call. A replica's warm-up can record this summary
(`optimize.profile_warmup`) beside the same summary in process (`bench_pipeline.py --served
--profile-warmup`), so the two can be compared kernel by kernel
(`benchmarks/compare_profiles.py`). Times are under the profiler, which adds its own overhead to
every op: compare two summaries, not a summary with a plain timing.
"""

import time
from typing import Any, Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

#: Rows each summary keeps: the kernels (and host ops) that took the most time.
TOP = 25


def profile_call(call: Callable[[], Any], device: torch.device, top: int = TOP) -> dict[str, Any]:
    """Run `call()` once under the profiler: its wall seconds, the device's kernel seconds, and
    the `top` device kernels and host ops by their own time (name, calls, milliseconds)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as recorded:
        started = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize(device)
        wall_s = time.perf_counter() - started
    events = recorded.key_averages()
    # Host ops carry the device time of the kernels they launched too: kernels are the device's
    # own events, so nothing is counted twice.
    kernels = sorted((e for e in events if e.device_type != DeviceType.CPU), key=lambda e: -e.self_device_time_total)
    host = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: -e.self_cpu_time_total)
    return {
        "wall_s": round(wall_s, 4),
        "device_s": round(sum(event.self_device_time_total for event in kernels) / 1e6, 4),
        "kernels": [_row(event.key, event.count, event.self_device_time_total) for event in kernels[:top]],
        "host_ops": [_row(event.key, event.count, event.self_cpu_time_total) for event in host[:top]],
    }


def _row(name: str, calls: int, microseconds: float) -> dict[str, Any]:
    return {"name": name[:120], "calls": calls, "ms": round(microseconds / 1000, 3)}
