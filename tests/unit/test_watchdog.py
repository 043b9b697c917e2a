"""Hardware-call deadlines (badged.keystore.watchdog), with real threads and locks.

A "hung device" here is a call that blocks on an Event the test controls --
the same as a TPM command to a SIGSTOPped swtpm, which
tests/faults/test_hung_tpm.py does for real.
"""

from __future__ import annotations

import threading
import time

import pytest

from badged.errors import KeyStoreUnavailableError
from badged.keystore.watchdog import CallGuard, DeviceWorker


def test_device_worker_deadline_fail_fast_and_recovery() -> None:
    worker = DeviceWorker("test-device", backend="test")
    release = threading.Event()
    ran: list[str] = []
    try:
        assert worker.call("quick", lambda: 42, 1.0) == 42
        t0 = time.monotonic()
        with pytest.raises(KeyStoreUnavailableError) as info:
            worker.call("hung", lambda: release.wait(30), 0.2)
        assert 0.2 <= time.monotonic() - t0 < 0.6 and info.value.raw == "deadline"
        assert worker.problem() is not None and "hung" in worker.problem()  # type: ignore[operator]
        t0 = time.monotonic()
        with pytest.raises(KeyStoreUnavailableError):  # stuck: fails at once
            worker.call("next", lambda: ran.append("next"), 5.0)
        assert time.monotonic() - t0 < 0.05
        release.set()  # the device answers again
        deadline = time.monotonic() + 2
        while worker.problem() is not None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert worker.call("after", lambda: "ok", 1.0) == "ok"
        assert ran == []  # the refused call was never sent
    finally:
        release.set()
        worker.stop()


def test_queued_call_whose_caller_gave_up_is_never_sent() -> None:
    worker = DeviceWorker("test-device", backend="test")
    release, sent = threading.Event(), threading.Event()
    try:
        blocker = threading.Thread(target=worker.call, args=("slow", lambda: release.wait(5), 5.0))
        blocker.start()
        time.sleep(0.05)
        with pytest.raises(KeyStoreUnavailableError):  # queued behind "slow", not yet stuck
            worker.call("queued", sent.set, 0.1)
        release.set()
        blocker.join()
        worker.call("sync", lambda: None, 1.0)
        assert not sent.is_set()
    finally:
        release.set()
        worker.stop()


def test_call_guard_bounds_lock_waits_and_fails_fast() -> None:
    lock = threading.RLock()
    guard = CallGuard(lock, timeout=0.2, backend="test")
    release, holding = threading.Event(), threading.Event()

    def hang() -> None:
        guard.acquire("hung call")
        holding.set()
        release.wait(30)
        guard.release()

    t = threading.Thread(target=hang)
    t.start()
    holding.wait(5)
    try:
        t0 = time.monotonic()
        with pytest.raises(KeyStoreUnavailableError):
            guard.acquire("waiting call")
        assert 0.2 <= time.monotonic() - t0 < 0.6
        time.sleep(0.05)
        assert guard.problem() is not None
        t0 = time.monotonic()
        with pytest.raises(KeyStoreUnavailableError):  # past the deadline: at once
            guard.acquire("later call")
        assert time.monotonic() - t0 < 0.05
    finally:
        release.set()
        t.join()
    assert guard.problem() is None
    guard.acquire("re-entrant")
    guard.acquire("nested")  # the same thread may nest (RLock)
    guard.release()
    guard.release()


def test_stale_tpm_references_mean_reconnect() -> None:
    """A TPM restarted under a live context answers REFERENCE_H0 (0x910) for
    handles it lost: that is UNAVAILABLE (drop the context, reconnect), not a
    key-store failure (seen when `badged dev` restarted a killed swtpm)."""
    from badged.keystore.tpm.store import translate

    class Tss2Error(Exception):
        def __init__(self, rc: int) -> None:
            super().__init__(hex(rc))
            self.rc = rc

    for rc in (0x910, 0x911, 0x918):
        err = translate(Tss2Error(rc), "signing")
        assert isinstance(err, KeyStoreUnavailableError) and err.raw == hex(rc), err


def test_a_running_command_whose_caller_gave_up_makes_the_device_stuck() -> None:
    """The command started late (queued behind another), so by its own clock it
    is not yet past its deadline when its caller gives up; the next caller must
    still fail at once, not queue behind it for a whole deadline more."""
    worker = DeviceWorker("test-device", backend="test")
    release = threading.Event()
    try:
        busy = threading.Thread(target=worker.call, args=("busy", lambda: time.sleep(0.15), 5.0))
        busy.start()
        time.sleep(0.02)
        with pytest.raises(KeyStoreUnavailableError):  # waits 0.3 s, ran only ~0.17 s of it
            worker.call("hung", lambda: release.wait(30), 0.3)
        busy.join()
        assert worker.problem() is not None
        t0 = time.monotonic()
        with pytest.raises(KeyStoreUnavailableError):
            worker.call("next", lambda: None, 5.0)
        assert time.monotonic() - t0 < 0.05
    finally:
        release.set()
        worker.stop()
