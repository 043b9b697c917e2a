"""Denials cannot fill the disk: repeated refusals become counted audit records.

Any local user may call the workload socket, and every refusal used to be one
full audit record (5.3 KB with the request echoed) plus two log lines: a uid
matching no rule produced 1,581 denials/s, 126 MB of audit log in 15 s
(issue 16). ``DenialAggregator`` wraps the audit sink the servicers write to:

* records that are not denials (``decision`` other than ``"deny"``) pass
  through untouched, so every credential made is still one record;
* the first denial of a kind -- same uid, event, rule and reason with the
  caller-chosen values (quoted strings, lists) masked -- in a window is
  written in full, with every string capped at ``FIELD_CAP`` characters and
  every list at ``LIST_CAP`` items, and says that repeats are counted;
* repeats within the window are counted, not written; when the window ends a
  ``denial.repeated`` record carries the count, the first and last time, and
  the kind. At most ``MAX_KINDS`` kinds are tracked at once (more flushes
  them all early), so the counters are bounded too.

Records of credentials made (``*.issued``) whose caller has reset the call
or gone away by the time the record is written are written as
``*.withheld`` (``callstate.gone_now``): the front never sends an answer on
a reset stream, so that credential never left the daemon. If the caller
goes while the ``issued`` record is being made durable, an
``*.undelivered`` record (same jti and credential hash) follows it: the
answer would be sent in the very step the append returns, and is not.

So a flood of identical refusals costs two records per kind per window,
whatever the rate. The log lines are rate-limited likewise
(``RefusalLogFilter``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from badged.listener.callstate import gone_now

_logger = logging.getLogger(__name__)

WINDOW_S = 60
FIELD_CAP = 256
LIST_CAP = 16
MAX_KINDS = 4096
_CALLER_VALUES = re.compile(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\d+")
_UID_IN_PEER = re.compile(r",uid=(\d+)")
_CREDENTIAL_FIELDS = ("agent", "jti", "credential_sha256", "kid", "request")


class AuditSink(Protocol):
    async def append(self, event: Mapping[str, Any]) -> object: ...


def capped(value: Any, depth: int = 0) -> Any:
    """``value`` with strings, lists and nesting cut to sizes a refusal may echo."""
    if isinstance(value, str):
        return value if len(value) <= FIELD_CAP else value[:FIELD_CAP] + "…"
    if isinstance(value, bytes):
        return capped(value.decode("utf-8", "replace"), depth)
    if isinstance(value, list | tuple):
        if depth >= 3:
            return f"<{len(value)} items>"
        out = [capped(v, depth + 1) for v in value[:LIST_CAP]]
        if len(value) > LIST_CAP:
            out.append(f"… {len(value) - LIST_CAP} more")
        return out
    if isinstance(value, Mapping):
        if depth >= 3:
            return f"<{len(value)} fields>"
        return {str(k)[:64]: capped(v, depth + 1) for k, v in list(value.items())[:32]}
    return value


def denial_kind(event: Mapping[str, Any]) -> tuple[str, ...]:
    """What makes two denials "the same": who, which event, which rule, which reason."""
    caller = event.get("caller")
    uid: object = caller.get("uid") if isinstance(caller, Mapping) else None
    if uid is None:
        peer = event.get("peer")
        m = _UID_IN_PEER.search(peer) if isinstance(peer, str) else None
        uid = m.group(1) if m else None
    reason = str(event.get("reason") or "")
    return (str(uid), str(event.get("event")), str(event.get("rule")),
            str(event.get("code", "")), str(event.get("method", "")),
            _CALLER_VALUES.sub("…", reason)[:FIELD_CAP])


@dataclass
class _Repeats:
    kind: tuple[str, ...]
    first_wall: int
    count: int = 0
    last_wall: int = 0
    flush: asyncio.TimerHandle | None = None


class DenialAggregator:
    """An ``AuditSink`` that writes repeated denials as counted records."""

    def __init__(self, audit: AuditSink, *, window: float = WINDOW_S,
                 wall: Callable[[], float] = time.time) -> None:
        self._audit = audit
        self._window = window
        self._wall = wall
        self._open: dict[tuple[str, ...], _Repeats] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.suppressed = 0  # denials counted instead of written (for tests and stats)

    def __getattr__(self, name: str) -> Any:
        """Everything but ``append`` is the wrapped sink's (e.g. an AuditLog's tools)."""
        return getattr(self._audit, name)

    async def append(self, event: Mapping[str, Any]) -> object:
        if event.get("decision") != "deny":
            name = event.get("event")
            if not isinstance(name, str) or not name.endswith(".issued"):
                return await self._audit.append(event)
            credential = name[:-len(".issued")]
            # What the loop has seen (no read of the socket here: ~2 µs a call saved; the
            # read before the signature is the one that keeps a credential from being made).
            if gone_now(catch_up=False):
                # Made, but its caller reset the call or left before the answer: the
                # front sends nothing on a reset stream, so it never left the daemon.
                return await self._audit.append({
                    **event, "event": credential + ".withheld",
                    "withheld": "caller reset the call or disconnected before the answer"})
            receipt = await self._audit.append(event)
            if gone_now(catch_up=False):
                # Gone while the record was being made durable: the answer, sent in this
                # same step if at all, will not be. Said so, after the fact.
                await self._audit.append({
                    "event": credential + ".undelivered", "decision": "allow",
                    **{k: event[k] for k in _CREDENTIAL_FIELDS if k in event},
                    "reason": "caller reset the call or disconnected while its record was "
                              "written; the credential was not sent"})
            return receipt
        kind = denial_kind(event)
        seen = self._open.get(kind)
        now = int(self._wall())
        if seen is not None:
            seen.count += 1
            seen.last_wall = now
            self.suppressed += 1
            return None
        if len(self._open) >= MAX_KINDS:
            self.flush_all()
        loop = asyncio.get_running_loop()
        entry = self._open[kind] = _Repeats(kind, now)
        entry.flush = loop.call_later(self._window, self._close, kind)
        record = {k: capped(v) for k, v in event.items()}
        record["repeats_counted_for_s"] = int(self._window)
        return await self._audit.append(record)

    def is_first(self, event: Mapping[str, Any]) -> bool:
        """Would ``event`` be written in full now? (Callers log only those.)"""
        return denial_kind(event) not in self._open

    def _close(self, kind: tuple[str, ...]) -> None:
        entry = self._open.pop(kind, None)
        if entry is None or not entry.count:
            return
        record = {"event": "denial.repeated", "decision": "deny-aggregate",
                  "uid": entry.kind[0], "of_event": entry.kind[1], "rule": entry.kind[2],
                  "code": entry.kind[3], "method": entry.kind[4], "reason": entry.kind[5],
                  "count": entry.count, "first_at": entry.first_wall,
                  "last_at": entry.last_wall, "window_s": int(self._window)}
        task = asyncio.get_running_loop().create_task(self._write(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, record: dict[str, Any]) -> None:
        try:
            await self._audit.append(record)
        except Exception:
            _logger.exception("could not write an aggregated denial record")

    def flush_all(self) -> None:
        """Write every pending count now (too many kinds, or shutting down)."""
        for kind in list(self._open):
            entry = self._open[kind]
            if entry.flush is not None:
                entry.flush.cancel()
            self._close(kind)

    async def aclose(self) -> None:
        self.flush_all()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class RefusalLogFilter(logging.Filter):
    """Let one refusal line per kind through per interval; the next says how many were dropped.

    Installed on the loggers that log a line per refused request
    (``install_refusal_log_limits``); other records pass untouched.
    """

    MESSAGES = frozenset({"denied", "request refused"})

    def __init__(self, *, interval: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_kinds: int = 4096) -> None:
        super().__init__()
        self._interval = interval
        self._clock = clock
        self._max_kinds = max_kinds
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self.MESSAGES:
            return True
        kind = (str(record.msg), str(getattr(record, "uid", "")), str(getattr(record, "code", "")),
                str(getattr(record, "method", "")), str(getattr(record, "agent", "")))
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last[0] < self._interval:
            self._last[kind] = (last[0], last[1] + 1)
            return False
        if len(self._last) >= self._max_kinds:
            self._last.clear()
        self._last[kind] = (now, 0)
        if last is not None and last[1]:
            record.suppressed = last[1]
        return True


def install_refusal_log_limits(interval: float = 10.0) -> RefusalLogFilter:
    """Rate-limit the per-refusal log lines of the servicers and the error boundary.

    A logger filter only sees records logged to that very logger, so it goes
    on every ``badged.*`` logger that exists once the servicers are imported
    (the composition root calls this after wiring them): a handler moved to
    another module keeps its rate limit. Only the refusal messages are
    touched.
    """
    flt = RefusalLogFilter(interval=interval)
    names = {"badged.service.errors", "badged.service.issuance", "badged.service.workload"}
    names.update(n for n in logging.root.manager.loggerDict if n.startswith("badged."))
    for name in sorted(names):
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)
    return flt


class DenialCounter:
    """The composition root's handle: wraps the audit sink once, flushes at stop."""

    def __init__(self) -> None:
        self.aggregator: DenialAggregator | None = None

    def wrap(self, audit: AuditSink) -> DenialAggregator:
        self.aggregator = DenialAggregator(audit)
        return self.aggregator

    async def aclose(self) -> None:
        if self.aggregator is not None:
            await self.aggregator.aclose()
