"""Compiled batch shapes: a forward (or a decode) of any size runs as calls of bucket sizes.

A compiled graph exists per batch size in the buckets, so work of `count` rows runs as the set of
calls with the least total time, each padded up to the smallest bucket that holds it. Costs are
the seconds of one call per bucket, timed at warm-up, then from the calls the replica serves
(`CallPlanner.observed`); until timed, a call counts as its padded size.
"""

import statistics
from collections import deque
from typing import Optional, Sequence

#: Served calls per bucket whose median is its price (`CallPlanner.observed`): the last few
#: seconds of a loaded replica's calls, so a price follows the card within seconds.
SERVED_WINDOW = 8
#: Served calls a bucket needs before their median replaces its warm-up price.
SERVED_MIN = 3


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
        #: The latest served calls' seconds per bucket (`observed`), and how many were observed.
        self._served: dict[int, deque[float]] = {}
        self.served_calls: dict[int, int] = {}

    def timed(self, size: int, rounds: Sequence[float]) -> None:
        """Price bucket `size` from timing `rounds` (seconds of one call each): their least, since
        a transient (the first seconds after a compiled warm-up, another process's burst) only
        ever adds time."""
        self.timing_rounds[size] = [round(seconds, 4) for seconds in rounds]
        self.costs[size] = min(rounds)

    def observed(self, size: int, seconds: float) -> None:
        """A served call of bucket `size` took `seconds`: once `SERVED_MIN` have run, the median of
        the last `SERVED_WINDOW` is the bucket's price. Why: the warm-up's price can be wrong for
        as long as a replica lives. An H200 Serve replica timed its 16-row call at 0.38-0.84 s in
        every warm-up round, then ran it at 0.285 s seconds later (the same call in process: 0.282
        s); priced at 0.38 s or more, every group of up to 13 rows ran as 2-row calls, the
        others deferred (BENCHMARKS.md, "Prices from served calls")."""
        window = self._served.setdefault(size, deque(maxlen=SERVED_WINDOW))
        window.append(seconds)
        self.served_calls[size] = self.served_calls.get(size, 0) + 1
        if len(window) >= SERVED_MIN:
            self.costs[size] = statistics.median(window)

    def on_trial(self, size: int) -> bool:
        """Whether bucket `size` has a warm-up price but not yet `SERVED_MIN` served calls."""
        return size in self.timing_rounds and self.served_calls.get(size, 0) < SERVED_MIN

    def split(self, count: int) -> list[int]:
        """Sizes of the calls that run `count` rows (one call without buckets), planned on
        `costs` with each bucket on trial priced no higher than the bucket below it. Why: a
        bucket priced too high at warm-up is never planned, so no served call ever corrects
        it (an H200 replica priced its 16-row call at 0.60 s, ran 800 calls of 2 rows at 16
        clients and none of 16; BENCHMARKS.md, "Prices from served calls"). Planned as if
        batching were free, a group that needs more than one call of the bucket below runs as
        one call of it, until `SERVED_MIN` such calls have priced it."""
        if not self.buckets:
            return [count]
        costs = dict(self.costs)
        for smaller, size in zip(self.buckets, self.buckets[1:]):
            if self.on_trial(size):
                costs[size] = min(costs[size], costs[smaller])
        return plan_calls(count, costs)

    def padded(self, size: int) -> int:
        return padded_size(size, self.buckets)
