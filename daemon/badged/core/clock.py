"""The clock is a parameter: core logic never reads time itself."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Returns seconds since the epoch (like time.time)."""


def system_clock() -> float:
    return time.time()


class FixedClock:
    """A settable clock for tests and for replaying decisions."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
