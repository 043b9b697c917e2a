"""Log lines a hostile caller can trigger, at most once per interval per kind, with counts.

A uid that matches no rule could make the daemon log two lines per refused
request (1,581 a second measured in issue 16), and asyncio logged hundreds of
thousands of "accept() out of system resource" tracebacks under fd
exhaustion. Each kind of line here is logged the first time, then suppressed
and counted; the next line of that kind after ``interval`` seconds carries
how many were suppressed since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Throttled:
    """One logger, ``interval`` seconds between two lines of the same message."""

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0,
                 level: int = logging.INFO, clock: Callable[[], float] = time.monotonic,
                 max_kinds: int = 256) -> None:
        self._logger = logger
        self._interval = interval
        self._level = level
        self._clock = clock
        self._max_kinds = max_kinds
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.total = 0  # every note, logged or not (for tests and the bench)

    def note(self, message: str, **extra: object) -> bool:
        """Count one occurrence; log it if this kind was quiet for ``interval``. True if logged."""
        self.total += 1
        now = self._clock()
        last = self._last.get(message)
        if last is not None and now - last < self._interval:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return False
        if last is None and len(self._last) >= self._max_kinds:
            self._last.clear()  # messages are constants: this only bounds a misuse
            self._suppressed.clear()
        self._last[message] = now
        suppressed = self._suppressed.pop(message, 0)
        if suppressed:
            extra["suppressed"] = suppressed
            extra["interval_s"] = self._interval
        self._logger.log(self._level, message, extra=extra)
        return True
