"""Compiled batch shapes: a forward (or a decode) of any size runs as calls of bucket sizes.

A compiled graph exists per batch size in the buckets, so work of `count` rows runs as the set of
calls with the least total time, each padded up to the smallest bucket that holds it. Costs are
the seconds of one call per bucket, timed at warm-up; until then a call counts as its padded size.
"""

from typing import Optional, Sequence


def plan_calls(count: int, bucket_costs: dict[int, float]) -> list[int]:
    """How many rows each call takes, at the least total cost; ties go to fewer calls.

    With buckets [2, 16] UNet rows on an H100 (1.15 s and 8.1 s per 30-step call of 1 and 8 CFG
    images), five images (10 rows) are cheaper as five calls of 2 than as one call padded to 16;
    eight go in one call.
    """
    buckets = sorted(bucket_costs)
    cost_of = [0.0] + [bucket_costs[next(b for b in buckets if b >= k)] for k in range(1, buckets[-1] + 1)]
    # best[m]: (cost, number of calls, first call's size) for m rows.
    best: list[tuple[float, int, int]] = [(0.0, 0, 0)]
    for m in range(1, count + 1):
        best.append(
            min(
                (best[m - k][0] + cost_of[k], best[m - k][1] + 1, k)
                for k in range(1, min(m, buckets[-1]) + 1)
            )
        )
    sizes = []
    while count:
        sizes.append(best[count][2])
        count -= best[count][2]
    return sorted(sizes, reverse=True)


def padded_size(size: int, buckets: Optional[Sequence[int]]) -> int:
    """The bucket a call of `size` rows runs at (its own size without buckets)."""
    if not buckets:
        return size
    return next((bucket for bucket in sorted(buckets) if bucket >= size), size)


class CallPlanner:
    """Bucket sizes and their measured costs for one kind of call (UNet forwards, VAE decodes)."""

    def __init__(self, buckets: Optional[Sequence[int]]):
        self.buckets = sorted(buckets) if buckets else None
        self.costs: dict[int, float] = {size: float(size) for size in self.buckets or []}
        #: Each timed bucket's rounds (seconds), as `timed` was given them: how the cost settled.
        self.timing_rounds: dict[int, list[float]] = {}

    def timed(self, size: int, rounds: Sequence[float]) -> None:
        """Price bucket `size` from timing `rounds` (seconds of one call each): their least, since
        a transient (the first seconds after a compiled warm-up, another process's burst) only
        ever adds time."""
        self.timing_rounds[size] = [round(seconds, 4) for seconds in rounds]
        self.costs[size] = min(rounds)

    def split(self, count: int) -> list[int]:
        """Sizes of the calls that run `count` rows (one call without buckets)."""
        return plan_calls(count, self.costs) if self.buckets else [count]

    def padded(self, size: int) -> int:
        return padded_size(size, self.buckets)
