"""The clocks are parameters: core logic never reads time itself.

Two clocks, for two jobs (issue 15: a wall-clock step emptied rate budgets
for 18 s and kept a 30 s grant alive 40 s later):

* :data:`Clock` -- wall time (``time.time``), for what is *written down*:
  claims (``iat``/``exp``), audit records, the expiry a grant is recorded
  with. It may step (NTP step, an operator's ``date -s``, a VM restored).
* :data:`Monotonic` -- :func:`monotonic_clock`, for what *counts down*: rate
  buckets, grant and delegation lifetimes, timers. It never steps. Linux's
  ``CLOCK_BOOTTIME`` is used where it exists: like ``CLOCK_MONOTONIC`` it is
  immune to steps, and unlike it it keeps counting while the machine is
  suspended, so a 30-minute grant does not outlive a 2-hour suspend.

:class:`StepDetector` notices when the two disagree (the wall clock stepped)
so the daemon can audit it (docs/time.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Returns seconds since the epoch (like time.time)."""

Monotonic = Callable[[], float]
"""Returns seconds from an arbitrary origin; never steps (see monotonic_clock)."""

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def system_clock() -> float:
    return time.time()


def monotonic_clock() -> float:
    """Seconds on CLOCK_BOOTTIME (steps never, counts suspend), else time.monotonic."""
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()


class FixedClock:
    """A settable clock for tests and for replaying decisions."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


STEP_THRESHOLD_S = 2.0
"""A change of (wall - monotonic) this large between two checks is a step.
NTP slews at most 0.5 ms/s, so a check every second never mistakes a slew."""


class StepDetector:
    """Compares the wall clock with the monotonic one at every ``check()``.

    Returns the size of a step (seconds, negative = backwards) once per step,
    and None otherwise. The offset is re-based at every check, so a slow
    slew never adds up to a false step.
    """

    def __init__(self, wall: Clock = system_clock, mono: Monotonic = monotonic_clock, *,
                 threshold: float = STEP_THRESHOLD_S) -> None:
        self._wall = wall
        self._mono = mono
        self._threshold = threshold
        self._offset = wall() - mono()

    def check(self) -> float | None:
        offset = self._wall() - self._mono()
        delta, self._offset = offset - self._offset, offset
        return delta if abs(delta) >= self._threshold else None
