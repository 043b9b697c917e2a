"""append_later: a record nobody waits for rides with the next batch, or goes when due.

The credential proxy's ``proxy.completed`` follows an answer already given;
these tests hold the log to what docs/proxy.md promises for it: written in
chain order with the next awaited record (no fsync of its own), durable at
most ``LATER_S`` after it was queued when nothing else comes, written before
the final checkpoint at close, and refused like any append when it cannot be
logged.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from badged.audit import verify
from badged.audit.log import LATER_S
from badged.errors import AuditError
from badged.keystore.port import KeyHandle
from tests.audit.helpers import all_records, open_log


def test_a_later_record_rides_with_the_next_awaited_one(audit_dir: Path) -> None:
    """Inline (solo) and through the writer thread: one batch, one fsync, chain order."""
    syncs: list[str] = []

    def fsync(fd: int) -> None:
        syncs.append(threading.current_thread().name)
        os.fsync(fd)

    log = open_log(audit_dir, fsync=fsync)

    async def go(solo: bool) -> None:
        log.solo = lambda: solo
        log.append_later({"event": "proxy.completed", "i": 1})
        log.append_later({"event": "proxy.completed", "i": 2})
        before = len(syncs)
        receipt = await log.append({"event": "proxy.allowed"})
        assert len(syncs) == before + 1  # the later records took no fsync of their own
        # The awaited record is durable, and so is everything chained before it.
        assert log.stats.synced_seq == receipt.seq
        assert log.stats.records == receipt.seq

    asyncio.run(go(True))
    assert syncs == ["MainThread"]
    asyncio.run(go(False))
    assert syncs[-1] == "badged-audit-writer" and len(syncs) == 2
    log.close()
    recs = all_records(audit_dir)
    assert [(r["event"], r.get("i")) for r in recs] == [
        ("proxy.completed", 1), ("proxy.completed", 2), ("proxy.allowed", None)] * 2
    assert verify(audit_dir).ok


def test_a_later_record_alone_is_durable_within_later_s(audit_dir: Path) -> None:
    synced = threading.Event()

    def fsync(fd: int) -> None:
        os.fsync(fd)
        synced.set()

    log = open_log(audit_dir, fsync=fsync)
    t0 = time.monotonic()
    log.append_later({"event": "proxy.completed"})
    assert not synced.wait(LATER_S / 4)  # not at once: it waits for company first
    assert synced.wait(10)
    waited = time.monotonic() - t0
    assert LATER_S / 4 <= waited < LATER_S + 5  # generous upper bound for a loaded box
    assert log.stats.records == 1
    assert [r["event"] for r in all_records(audit_dir)] == ["proxy.completed"]
    log.close()
    assert verify(audit_dir).ok


def test_on_the_loop_a_timer_makes_a_lone_later_record_durable(audit_dir: Path) -> None:
    """The daemon's case: no writer wake-up per record, one loop timer when due."""
    log = open_log(audit_dir)

    async def go() -> float:
        t0 = time.monotonic()
        for i in range(3):
            log.append_later({"event": "proxy.completed", "i": i})
        await asyncio.sleep(LATER_S / 4)
        assert log.stats.records == 0  # waiting for company
        deadline = time.monotonic() + 10
        while log.stats.records < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return time.monotonic() - t0

    waited = asyncio.run(go())
    assert log.stats.records == 3 and log.stats.batches == 1
    assert LATER_S / 4 <= waited < LATER_S + 5
    log.close()
    assert [r["i"] for r in all_records(audit_dir)] == [0, 1, 2]
    assert verify(audit_dir).ok


def test_close_writes_later_records_before_the_final_checkpoint(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    log = open_log(audit_dir, signer=mem_key)
    log.append_sync({"event": "daemon.start"})
    log.append_later({"event": "proxy.completed"})
    log.close()  # at once: well before LATER_S
    recs = all_records(audit_dir)
    assert [r["event"] for r in recs[:2]] == ["daemon.start", "proxy.completed"]
    assert recs[-1]["kind"] == "checkpoint" and recs[-1]["head_seq"] >= recs[1]["seq"]
    assert verify(audit_dir).ok


def test_a_later_record_is_refused_like_any_append(audit_dir: Path) -> None:
    log = open_log(audit_dir)
    with pytest.raises(ValueError):
        log.append_later({"event": "proxy.completed", "token": "eyJ..."})
    log.close()
    with pytest.raises(AuditError):
        log.append_later({"event": "proxy.completed"})
    assert all_records(audit_dir) == []
