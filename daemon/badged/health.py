"""Health that tells the truth: can each service issue what the policy allows, now?

Issue 15 found health SERVING while the audit disk was full, while the audit
log was poisoned, and while the key store was down: a load balancer or an
operator's probe then keeps sending work to a daemon that can only refuse it.
So each service's status is derived from what issuing needs:

* ``audit``: the log is not poisoned or closed (:attr:`AuditLog.problem`),
  its file system is writable and has room (statvfs, no write: a probe write
  would itself need room), and the last appends did not just fail;
* ``keystore``: the backend's own ``problem()`` (a hung or unreachable
  device; :mod:`badged.keystore.watchdog`), which reads state only. An idle
  device is pinged every ``PING_EVERY_S`` (off the event loop, with a short
  deadline), so a device that dies or hangs while nobody signs is noticed;
* ``policy``: a policy is in force and lets at least one agent be used.

The monitor polls every ``INTERVAL_S`` (cheap: one statvfs and attribute
reads) and recovers by itself when the cause goes away. Nothing here waits
for the hardware or a lock the hardware holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from badged.keystore.port import HealthReporter, KeyStore

_logger = logging.getLogger(__name__)

INTERVAL_S = 0.25
PING_EVERY_S = 0.5
MIN_FREE_BYTES = 64 * 1024
"""Below this, appends (and the next file rotation) are about to fail."""
FAILURE_WINDOW_S = 2.0
"""How long failed appends with no durable one since count as 'audit failing'."""

WORKLOAD = "badged.v1.WorkloadService"
ADMIN = "badged.v1.AdminService"
CREDENTIALS = "badged.v1.CredentialService"
ENROLLMENT = "badged.v1.EnrollmentService"
SPIFFE = "SpiffeWorkloadAPI"

NEEDS: Mapping[str, tuple[str, ...]] = {
    WORKLOAD: ("audit", "keystore", "policy"),
    CREDENTIALS: ("audit", "keystore", "policy"),
    SPIFFE: ("audit", "keystore", "policy"),
    ENROLLMENT: ("audit", "keystore"),
    # Admin answers reads without the token, but every change it makes is
    # audited first: without the log it can change nothing.
    ADMIN: ("audit",),
}
"""What each service needs to do its work; "" (the whole daemon) needs all."""


@dataclass(frozen=True)
class ServiceHealth:
    serving: bool
    reasons: tuple[str, ...]


def audit_problem(directory: Path, log_problem: str | None, *,
                  min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why no record can be made durable now, or None."""
    if log_problem is not None:
        return log_problem
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return f"audit directory unusable: {exc.strerror}"
    if st.f_flag & os.ST_RDONLY:
        return "audit file system is read-only"
    free = st.f_bavail * st.f_frsize
    if free < min_free:
        return f"audit disk full ({free} bytes free)"
    if st.f_files and st.f_favail == 0:
        return "audit file system has no free inodes"
    return None


class HealthMonitor:
    """Polls the causes and calls ``publish`` with every change of status."""

    def __init__(self, *, audit_dir: Path, audit_log_problem: Callable[[], str | None],
                 audit_counts: Callable[[], tuple[int, int]], keystore: KeyStore,
                 policy_problem: Callable[[], str | None],
                 publish: Callable[[dict[str, ServiceHealth]], Awaitable[None]],
                 interval: float = INTERVAL_S) -> None:
        self._audit_dir = audit_dir
        self._audit_log_problem = audit_log_problem
        self._audit_counts = audit_counts
        self._keystore = keystore
        self._policy_problem = policy_problem
        self._publish = publish
        self._interval = interval
        self._last: dict[str, ServiceHealth] | None = None
        self._counts = audit_counts()
        self._failing_since: float | None = None
        self._ping: asyncio.Future[None] | None = None
        self._last_ping = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> dict[str, ServiceHealth]:
        return dict(self._last or {})

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # a bug here must not end health reporting
                _logger.exception("health check failed")
            await asyncio.sleep(self._interval)

    async def poll(self) -> dict[str, ServiceHealth]:
        self._maybe_ping()
        causes = {"audit": self._audit(), "keystore": self._keystore_problem(),
                  "policy": self._policy_problem()}
        status: dict[str, ServiceHealth] = {}
        for service, needs in NEEDS.items():
            reasons = tuple(f"{need}: {causes[need]}" for need in needs if causes[need])
            status[service] = ServiceHealth(not reasons, reasons)
        everything = tuple(f"{k}: {v}" for k, v in causes.items() if v)
        status[""] = ServiceHealth(not everything, everything)
        if status != self._last:
            self._log_change(status)
            self._last = status
            await self._publish(status)
        return status

    def _log_change(self, status: dict[str, ServiceHealth]) -> None:
        overall = status[""]
        if overall.serving:
            if self._last is not None:
                _logger.warning("health: every service serving again")
        else:
            down = sorted(s for s, h in status.items() if s and not h.serving)
            _logger.warning("health: not serving", extra={"services": down,
                                                          "reasons": list(overall.reasons)})

    def _audit(self) -> str | None:
        problem = audit_problem(self._audit_dir, self._audit_log_problem())
        if problem is not None:
            return problem
        records, failed = self._audit_counts()
        old_records, old_failed = self._counts
        self._counts = (records, failed)
        now = time.monotonic()
        if records > old_records:
            self._failing_since = None
        elif failed > old_failed:
            self._failing_since = now
        if self._failing_since is not None and now - self._failing_since < FAILURE_WINDOW_S:
            return "audit appends are failing"
        return None

    def _keystore_problem(self) -> str | None:
        if isinstance(self._keystore, HealthReporter):
            return self._keystore.problem()
        return None

    def _maybe_ping(self) -> None:
        """Exercise the device now and then, on a thread, one ping at a time:
        a device that hangs or dies while idle then shows in ``problem()``."""
        now = time.monotonic()
        if self._ping is not None and not self._ping.done():
            return
        if now - self._last_ping < PING_EVERY_S:
            return
        self._last_ping = now
        loop = asyncio.get_running_loop()
        self._ping = loop.run_in_executor(None, self._ping_quietly)

    def _ping_quietly(self) -> None:
        try:
            self._keystore.ping()
        except Exception as exc:  # the store keeps the reason; problem() reports it
            _logger.debug("health ping failed: %s", exc)
