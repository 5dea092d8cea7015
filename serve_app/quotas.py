"""Per-key rate limits: token buckets of requests and images a minute.

One `RateLimiter` serves the whole app: it lives in the job manager's single replica (the one
place every ingress replica already reaches), so a key's quota holds however many ingress
replicas there are. Its counters are in memory: a restarted job manager starts every bucket full.
No torch, no Ray here.
"""

import time
from typing import Callable, Optional

from deployments.types import TooManyRequestsError

#: The window a per-minute quota refills over.
_MINUTE_S = 60.0


class QuotaExceededError(TooManyRequestsError):
    """A key's per-minute quota is spent: 429 with `Retry-After` saying when it will not be."""

    def __init__(self, message: str, retry_after_s: float, param: Optional[str] = None, code: Optional[str] = "rate_limited"):
        super().__init__(message, param, code)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (self.message, self.retry_after_s, self.param, self.code))


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        #: (key, what) → (tokens, when they were counted)
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def admit(self, key: str, limits: dict[str, Optional[int]], amounts: dict[str, int]) -> float:
        """Take `amounts[what]` tokens from each of `key`'s buckets whose per-minute limit is in
        `limits` (None: unlimited), all or none. 0.0 when taken; otherwise the seconds until they
        could be (nothing is taken). An amount above a limit can never be taken: 60 s."""
        now = self._clock()
        wanted = {what: (limit, amounts.get(what, 0)) for what, limit in limits.items() if limit is not None and amounts.get(what, 0)}
        levels = {}
        wait = 0.0
        for what, (limit, amount) in wanted.items():
            tokens, counted = self._buckets.get((key, what), (float(limit), now))
            tokens = min(float(limit), tokens + (now - counted) * limit / _MINUTE_S)
            levels[what] = tokens
            if amount > limit:
                wait = max(wait, _MINUTE_S)
            elif tokens < amount:
                wait = max(wait, (amount - tokens) * _MINUTE_S / limit)
        for what, tokens in levels.items():
            taken = 0 if wait else wanted[what][1]
            self._buckets[(key, what)] = (tokens - taken, now)
        return wait
