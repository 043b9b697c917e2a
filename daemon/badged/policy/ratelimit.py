"""Rate budgets per (agent, bundle): token buckets, clock passed in.

No I/O and no reading of time: ``now`` is an argument, so budgets are tested
with a fixed clock, and a clock that jumps backwards cannot mint tokens (the
bucket never refills for negative elapsed time).
"""

from __future__ import annotations

from dataclasses import dataclass

from badged.policy.model import Bundle


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _refill(self, agent: str, bundle: Bundle, now: float) -> _Bucket:
        assert bundle.rate is not None
        cap = float(bundle.rate.count)
        b = self._buckets.get((agent, bundle.name))
        if b is None:
            b = _Bucket(cap, now)
            self._buckets[(agent, bundle.name)] = b
        elapsed = max(0.0, now - b.stamp)  # clock went backwards: no refill
        b.tokens = min(cap, b.tokens + elapsed * cap / bundle.rate.window)
        b.stamp = max(b.stamp, now)
        return b

    def wait_time(self, agent: str, bundle: Bundle, now: float) -> float | None:
        """Seconds until one credential is affordable, or None if it is now."""
        if bundle.rate is None:
            return None
        b = self._refill(agent, bundle, now)
        if b.tokens >= 1.0:
            return None
        return (1.0 - b.tokens) * bundle.rate.window / bundle.rate.count

    def consume(self, agent: str, bundle: Bundle, now: float) -> None:
        if bundle.rate is None:
            return
        b = self._refill(agent, bundle, now)
        b.tokens = max(0.0, b.tokens - 1.0)
