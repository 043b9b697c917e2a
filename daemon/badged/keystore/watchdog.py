"""Deadlines for hardware calls: a device that stops answering never stalls a caller.

Why this exists: a TPM command is a blocking write/read on a socket or
character device, and the TSS offers no usable timeout for it (ESAPI's
synchronous calls loop on ``TRY_AGAIN`` whatever ``Esys_SetTimeout`` says,
and the swtpm TCTI refuses a receive timeout; measured with tpm2-tss 3.2:
a SIGSTOPped swtpm blocks ``GetRandom`` for as long as it is stopped). So
the thread that sent the command cannot be freed -- but nobody else has to
wait for it:

* :class:`DeviceWorker` -- one thread owns the device and runs every command;
  a caller waits for its command at most its deadline and then gets
  :class:`~badged.errors.KeyStoreUnavailableError`, while the worker stays
  inside the hung command. Once the running command is past its deadline
  the device is *stuck*: new calls fail at once, without queueing, until the
  command returns (the device answers again), and then everything works as
  before, with no restart. A queued command whose caller gave up is never
  sent. Used by the TPM store.
* :class:`CallGuard` -- for a backend that runs calls on the caller's thread
  under its own lock (PKCS#11 signs inline on the event loop: ~65 µs,
  less than a thread hand-off). It bounds the wait for the *lock* and fails
  fast while a call has held it past the deadline; the call that holds the
  lock cannot be interrupted (see docs/tpm.md, "Deadlines").

Both keep what health reporting needs (``problem()``) without touching the
device: reading them takes no device lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from badged.errors import KeyStoreUnavailableError

_logger = logging.getLogger(__name__)
T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = ("abandoned", "done", "error", "fn", "result", "started", "timeout", "what")

    def __init__(self, what: str, fn: Callable[[], T], timeout: float) -> None:
        self.what = what
        self.fn = fn
        self.timeout = timeout
        self.started = 0.0
        self.abandoned = False
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class DeviceWorker:
    """One thread that sends every command to a device, with per-call deadlines."""

    def __init__(self, name: str, *, backend: str) -> None:
        self._backend = backend
        self._queue: queue.SimpleQueue[_Job[object] | None] = queue.SimpleQueue()
        self._running: _Job[object] | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def stuck_for(self) -> float | None:
        """Seconds the running command is past its deadline, or None if it is not.

        A running command whose caller already gave up counts as past its
        deadline even if it started later than its caller began to wait (it
        queued behind another): otherwise the next caller would be queued
        behind it and wait a whole deadline more -- seen as a 2 s FetchToken
        with a 1 s deadline when a TPM stopped under load.
        """
        job = self._running
        if job is None:
            return None
        over = time.monotonic() - job.started - job.timeout
        if over > 0:
            return over
        return 0.0 if job.abandoned else None

    def problem(self) -> str | None:
        job = self._running
        if job is None or self.stuck_for() is None:
            return None
        return (f"the device has not answered {job.what} for "
                f"{time.monotonic() - job.started:.1f} s (deadline {job.timeout:g} s)")

    def call(self, what: str, fn: Callable[[], T], timeout: float) -> T:
        """Run ``fn`` on the device thread; wait at most ``timeout`` seconds."""
        if threading.current_thread() is self._thread:
            return fn()  # a command that needs another (nested): already on the device
        stuck = self.problem()
        if stuck is not None:
            raise KeyStoreUnavailableError(f"{what}: {stuck}", backend=self._backend,
                                           raw="deadline")
        job: _Job[T] = _Job(what, fn, timeout)
        self._queue.put(job)  # type: ignore[arg-type]
        if not job.done.wait(timeout):
            job.abandoned = True  # still queued: never sent; running: result dropped
            _logger.warning("hardware call past its deadline",
                            extra={"op": what, "deadline": timeout, "backend": self._backend})
            raise KeyStoreUnavailableError(f"{what}: no answer from the device within "
                                           f"{timeout:g} s", backend=self._backend,
                                           raw="deadline")
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def stop(self, timeout: float = 1.0) -> None:
        """Let queued commands finish (bounded); a hung one is left behind."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _main(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.abandoned:
                job.done.set()
                continue
            job.started = time.monotonic()
            self._running = job
            try:
                job.result = job.fn()
            except BaseException as exc:  # delivered to the caller
                job.error = exc
            finally:
                self._running = None
                job.done.set()
            if job.abandoned:
                _logger.info("device answered a call after its deadline",
                             extra={"op": job.what, "backend": self._backend,
                                    "took": round(time.monotonic() - job.started, 3)})


class CallGuard:
    """Bounded lock waits and fail-fast for a backend that calls inline.

    ``acquire(what)`` takes the backend's lock within ``timeout`` or raises
    KeyStoreUnavailableError; while the holder is past ``timeout`` it raises
    at once. Uncontended, this is one C-level lock acquire and one
    ``time.monotonic()`` -- nothing measurable on a ~65 µs signature.
    """

    def __init__(self, lock: threading.RLock, *, timeout: float, backend: str) -> None:
        self._lock = lock
        self.timeout = timeout
        self._backend = backend
        self._held_since = 0.0
        self._depth = 0

    def problem(self) -> str | None:
        since = self._held_since
        if since and time.monotonic() - since > self.timeout:
            return f"a token call has not returned for {time.monotonic() - since:.1f} s"
        return None

    def acquire(self, what: str) -> None:
        lock = self._lock
        if not lock.acquire(blocking=False):  # held by another thread
            stuck = self.problem()
            if stuck is not None:
                raise KeyStoreUnavailableError(f"{what}: {stuck}", backend=self._backend,
                                               raw="deadline")
            if not lock.acquire(timeout=self.timeout):
                raise KeyStoreUnavailableError(
                    f"{what}: token busy for more than {self.timeout:g} s",
                    backend=self._backend, raw="deadline")
        # Held from here on: _depth and _held_since change only under the lock.
        self._depth += 1
        if self._depth == 1:
            self._held_since = time.monotonic()

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._held_since = 0.0
        self._lock.release()
