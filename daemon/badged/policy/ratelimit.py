"""Rate budgets per (agent, bundle): token buckets on the monotonic clock.

No I/O. Time comes from a :data:`~badged.core.clock.Monotonic` clock given
at construction, never from the wall clock: issue 15 saw a -1 h step of the
wall clock keep a budget empty for 18 s (the bucket refused to refill for
"negative" elapsed time). On a clock that cannot step, a bucket refills at
its rate whatever the wall clock does. Tests pass a FixedClock.
"""

from __future__ import annotations

from dataclasses import dataclass

from badged.core.clock import Monotonic, monotonic_clock
from badged.policy.model import Bundle


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, clock: Monotonic = monotonic_clock) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _refill(self, agent: str, bundle: Bundle) -> _Bucket:
        assert bundle.rate is not None
        now = self._clock()
        cap = float(bundle.rate.count)
        b = self._buckets.get((agent, bundle.name))
        if b is None:
            b = _Bucket(cap, now)
            self._buckets[(agent, bundle.name)] = b
        elapsed = max(0.0, now - b.stamp)  # defensive: a monotonic clock never goes back
        b.tokens = min(cap, b.tokens + elapsed * cap / bundle.rate.window)
        b.stamp = max(b.stamp, now)
        return b

    def wait_time(self, agent: str, bundle: Bundle) -> float | None:
        """Seconds until one credential is affordable, or None if it is now."""
        if bundle.rate is None:
            return None
        b = self._refill(agent, bundle)
        if b.tokens >= 1.0:
            return None
        return (1.0 - b.tokens) * bundle.rate.window / bundle.rate.count

    def consume(self, agent: str, bundle: Bundle) -> None:
        if bundle.rate is None:
            return
        b = self._refill(agent, bundle)
        b.tokens = max(0.0, b.tokens - 1.0)
