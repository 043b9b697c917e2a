"""The writer: chain, durability before acknowledgement, group commit, faults."""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from badged.audit import AuditConfig, AuditLog, AuditReceipt, verify
from badged.audit.files import file_name, list_files
from badged.audit.record import GENESIS
from badged.errors import AuditError, ConfigError
from tests.audit.helpers import T0, FakeClock, all_records, log_lines, open_log, tmpfs


def test_records_are_chained_and_receipts_match(audit_dir: Path) -> None:
    log = open_log(audit_dir)
    r1 = log.append_sync({"event": "daemon.start"})

    async def issue() -> list[AuditReceipt]:
        return list(await asyncio.gather(*[
            log.append({"event": "token.issued", "agent": "a", "jti": f"j{i}"})
            for i in range(5)]))

    receipts = [r1, *asyncio.run(issue())]
    log.close()
    recs = all_records(audit_dir)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(recs):
        assert after["prev"] == before["hash"]
    assert [(r.seq, r.hash) for r in receipts] == [(r["seq"], r["hash"]) for r in recs]
    assert [r["jti"] for r in recs[1:]] == [f"j{i}" for i in range(5)]
    assert verify(audit_dir).ok


def test_reopen_continues_the_chain(audit_dir: Path) -> None:
    log = open_log(audit_dir)
    log.append_sync({"event": "a"})
    log.close()
    log = open_log(audit_dir)
    r = log.append_sync({"event": "b"})
    log.close()
    recs = all_records(audit_dir)
    assert r.seq == 2 and recs[1]["prev"] == recs[0]["hash"]
    assert verify(audit_dir).ok


def test_time_comes_from_the_injected_clock_as_rfc3339_utc(audit_dir: Path) -> None:
    log = open_log(audit_dir, clock=FakeClock(now=T0 + 0.5, tick=0.0))
    r = log.append_sync({"event": "a"})
    log.close()
    # T0 = 1_790_000_000 s after the epoch = 2026-09-21T14:13:20Z
    assert r.time == "2026-09-21T14:13:20.500000Z"
    assert all_records(audit_dir)[0]["time"] == r.time


def test_clock_going_backwards_is_stated_in_the_record(audit_dir: Path) -> None:
    clock = FakeClock(tick=0.0)
    log = open_log(audit_dir, clock=clock)
    log.append_sync({"event": "a"})
    clock.now -= 30.0
    log.append_sync({"event": "b"})
    log.append_sync({"event": "c"})
    log.close()
    recs = all_records(audit_dir)
    assert "clock_backwards_s" not in recs[0]
    assert recs[1]["clock_backwards_s"] == 30.0
    assert "clock_backwards_s" not in recs[2]
    report = verify(audit_dir)
    assert report.ok and report.clock_steps_back == 1


def test_clock_backwards_across_a_restart_is_noticed(audit_dir: Path) -> None:
    clock = FakeClock(tick=0.0)
    log = open_log(audit_dir, clock=clock)
    log.append_sync({"event": "a"})
    log.close()
    clock.now -= 5
    log = open_log(audit_dir, clock=clock)
    log.append_sync({"event": "b"})
    log.close()
    assert all_records(audit_dir)[1]["clock_backwards_s"] == 5.0


def test_dir_is_0700_and_files_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        log = open_log(tmp_path / "a" / "audit")
        log.append_sync({"event": "a"})
        log.close()
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o777)
        open_log(loose).close()
    finally:
        os.umask(old)
    for d in (tmp_path / "a" / "audit", loose):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_secret_fields_are_refused_and_nothing_is_written(audit_dir: Path) -> None:
    log = open_log(audit_dir)

    async def go() -> None:
        with pytest.raises(ValueError):
            await log.append({"event": "token.issued", "token": "eyJ..."})

    asyncio.run(go())
    with pytest.raises(ValueError):
        log.append_sync({"event": "x", "caller": {"pin": "1234"}})
    assert log.append_sync({"event": "ok"}).seq == 1
    log.close()
    assert b"eyJ" not in (audit_dir / file_name(1)).read_bytes()


class GatedFsync:
    """fsync that, once armed, blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.calls = 0
        self.armed = False
        self.gate = threading.Event()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.armed:
            self.gate.wait(30)  # only a deadlock guard; the test opens it
        os.fsync(fd)


def test_group_commit_shares_fsyncs_and_acks_only_after_fsync(audit_dir: Path) -> None:
    fsync = GatedFsync()
    log = open_log(audit_dir, fsync=fsync)
    n = 200

    async def go() -> list[int]:
        fsync.armed = True
        tasks = [asyncio.create_task(log.append({"event": "token.issued", "jti": str(i)}))
                 for i in range(n)]
        while log.stats.assigned < n:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        # Every record is chained and queued, but no fsync has returned:
        # nobody may have been told "durable" yet.
        assert not any(t.done() for t in tasks)
        assert log.stats.records == 0
        fsync.gate.set()
        return [r.seq for r in await asyncio.gather(*tasks)]

    seqs = asyncio.run(go())
    log.close()
    assert sorted(seqs) == list(range(1, n + 1))
    # At most one batch was in flight when the gate closed; the rest queued
    # behind it and went out together.
    assert fsync.calls <= 2
    assert log.stats.batches == fsync.calls and log.stats.records == n
    assert verify(audit_dir).ok


def _run_beside_threads(go: Callable[[], Coroutine[Any, Any, None]],
                        worker: Callable[[int], None], n: int) -> None:
    """Run the event loop's appends while ``n`` threads run ``worker(k)``."""
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    asyncio.run(go())
    for t in threads:
        t.join()


def test_sync_and_async_appenders_from_threads_share_one_chain(audit_dir: Path) -> None:
    log = open_log(audit_dir)

    def worker(k: int) -> None:
        for i in range(25):
            log.append_sync({"event": "t", "who": k, "i": i})

    async def go() -> None:
        await asyncio.gather(*[log.append({"event": "a", "i": i}) for i in range(50)])

    _run_beside_threads(go, worker, 4)
    log.close()
    assert len(all_records(audit_dir)) == 150
    assert verify(audit_dir).ok


def test_rotation_by_size_keeps_the_chain_across_files(audit_dir: Path) -> None:
    log = open_log(audit_dir, rotate_bytes=1500)
    for i in range(40):
        log.append_sync({"event": "token.issued", "i": i})
    log.close()
    paths = list_files(audit_dir)
    assert len(paths) >= 3
    for older, newer in itertools.pairwise(paths):
        last = json.loads(older.read_bytes().splitlines()[-1])
        first = json.loads(newer.read_bytes().splitlines()[0])
        assert first["prev"] == last["hash"] and first["seq"] == last["seq"] + 1
        assert newer.name == file_name(first["seq"])
    report = verify(audit_dir)
    assert report.ok and report.records == 40 and report.files == len(paths)


def test_rotation_by_time(audit_dir: Path) -> None:
    clock = FakeClock(tick=0.0)
    log = open_log(audit_dir, clock=clock, rotate_seconds=3600)
    log.append_sync({"event": "a"})
    log.append_sync({"event": "b"})
    clock.now += 3601
    log.append_sync({"event": "c"})
    log.close()
    assert [p.name for p in list_files(audit_dir)] == [file_name(1), file_name(3)]
    assert verify(audit_dir).ok


def test_a_second_writer_is_refused(audit_dir: Path) -> None:
    log = open_log(audit_dir)
    with pytest.raises(ConfigError, match="in use"):
        open_log(audit_dir)
    log.close()
    open_log(audit_dir).close()


def test_path_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError):
        open_log(tmp_path / "f")
    with pytest.raises(ConfigError):
        open_log(tmp_path / "f" / "audit")


def test_read_only_filesystem_is_a_config_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", readonly=True) as ro:
        with pytest.raises(ConfigError, match="unusable"):
            open_log(ro)
        with pytest.raises(ConfigError):
            open_log(ro / "sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_directory_without_write_permission_is_a_config_error(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    d.mkdir(mode=0o500)
    with pytest.raises(ConfigError):
        open_log(d)


def test_closed_log_refuses_appends(audit_dir: Path) -> None:
    log = open_log(audit_dir)
    log.close()
    log.close()  # idempotent
    with pytest.raises(AuditError):
        log.append_sync({"event": "late"})


class FaultyWrite:
    """os.write that can fail like a full disk, optionally after a short write."""

    def __init__(self) -> None:
        self.fail = False
        self.short_first = False

    def __call__(self, fd: int, data: bytes) -> int:
        if self.fail:
            if self.short_first:
                self.short_first = False
                return os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)


@pytest.mark.parametrize("short_first", [False, True], ids=["enospc", "short-write-then-enospc"])
def test_disk_full_fails_the_append_and_the_log_recovers(audit_dir: Path,
                                                         short_first: bool) -> None:
    write = FaultyWrite()
    log = open_log(audit_dir, write=write)
    log.append_sync({"event": "a"})
    size = (audit_dir / file_name(1)).stat().st_size
    write.fail, write.short_first = True, short_first

    async def go() -> None:
        results = await asyncio.gather(
            *[log.append({"event": "token.issued", "jti": str(i)}) for i in range(5)],
            return_exceptions=True)
        assert all(isinstance(r, AuditError) for r in results), results

    asyncio.run(go())
    with pytest.raises(AuditError):
        log.append_sync({"event": "b"})
    # The half-written batch is cut back: the file is exactly as before.
    assert (audit_dir / file_name(1)).stat().st_size == size
    write.fail = False
    r = log.append_sync({"event": "after"})
    log.close()
    assert r.seq == 2  # the failed records' seqs were never acknowledged, so reused
    assert [x["event"] for x in all_records(audit_dir)] == ["a", "after"]
    assert verify(audit_dir).ok


def test_fsync_failure_poisons_the_log_until_restart(audit_dir: Path) -> None:
    broken = {"on": False}

    def fsync(fd: int) -> None:
        if broken["on"]:
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)

    log = open_log(audit_dir, fsync=fsync)
    log.append_sync({"event": "a"})
    broken["on"] = True
    with pytest.raises(AuditError):
        log.append_sync({"event": "b"})
    broken["on"] = False
    # After a failed fsync the kernel may have dropped the pages: fail closed.
    with pytest.raises(AuditError, match="restart"):
        log.append_sync({"event": "c"})
    log.close()
    log = open_log(audit_dir)
    assert log.append_sync({"event": "d"}).seq == 2
    log.close()
    assert verify(audit_dir).ok


def test_cancelled_caller_does_not_break_the_log(audit_dir: Path) -> None:
    fsync = GatedFsync()
    log = open_log(audit_dir, fsync=fsync)

    async def go() -> None:
        fsync.armed = True
        task = asyncio.create_task(log.append({"event": "a"}))
        while log.stats.assigned < 1:
            await asyncio.sleep(0)
        task.cancel()
        fsync.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await log.append({"event": "b"})).seq == 2

    asyncio.run(go())
    log.close()
    assert verify(audit_dir).ok


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ConfigError):
        AuditConfig(directory=Path("/x"), rotate_bytes=0)
    with pytest.raises(ConfigError):
        AuditConfig(directory=Path("/x"), checkpoint_records=0)


def test_open_without_signer_works_and_checkpoints_are_noops(audit_dir: Path) -> None:
    log = AuditLog.open(AuditConfig(directory=audit_dir))
    log.append_sync({"event": "a"})
    assert log.checkpoint_sync() is None
    log.close()
    assert verify(audit_dir).ok


def test_mirror_gets_every_durable_record_and_its_failures_do_not_matter(
        audit_dir: Path) -> None:
    from badged.audit import AuditConfig, AuditLog

    copied: list[bytes] = []
    calls = {"n": 0}

    def mirror(batch: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("syslog down")
        copied.extend(batch.splitlines(keepends=True))

    log = AuditLog.open(AuditConfig(directory=audit_dir), mirror=mirror)
    for i in range(5):
        log.append_sync({"event": "x", "i": i})
    log.close()
    stored = [line for _p, lines in log_lines(audit_dir) for line in lines]
    assert calls["n"] == 5
    assert copied == stored[:1] + stored[2:]  # batch 2 was lost by the mirror only
    assert verify(audit_dir).ok


def test_syslog_mirror_sends_one_message_per_record(monkeypatch: pytest.MonkeyPatch) -> None:
    import syslog

    from badged.audit.mirror import MAX_MESSAGE, syslog_mirror

    sent: list[str] = []
    monkeypatch.setattr(syslog, "openlog", lambda *a: None)
    monkeypatch.setattr(syslog, "syslog", lambda prio, msg: sent.append(msg))
    send = syslog_mirror()
    send(b'{"seq":1}\n{"seq":2}\n')
    send(b'{"x":"' + b"a" * (MAX_MESSAGE + 10) + b'"}\n')
    assert sent[:2] == ['{"seq":1}', '{"seq":2}']
    assert sent[2].endswith("...(truncated)") and len(sent[2]) < MAX_MESSAGE + 20


def test_unserializable_value_is_refused_before_it_takes_a_seq(audit_dir: Path) -> None:
    import datetime as dt

    log = open_log(audit_dir)
    with pytest.raises(TypeError):
        log.append_sync({"event": "x", "when": dt.datetime.now(dt.UTC)})
    with pytest.raises(ValueError):
        log.append_sync({"event": "x", "ratio": float("inf")})
    r = log.append_sync({"event": "ok"})
    assert r.seq == 1 and log.head == r
    log.close()
    assert verify(audit_dir).ok


def test_lone_append_is_written_inline_and_durable_before_it_returns(audit_dir: Path) -> None:
    """solo(): the record is written and fsync'd on the caller's thread, chain intact."""
    calls: list[str] = []

    def fsync(fd: int) -> None:
        calls.append(threading.current_thread().name)
        os.fsync(fd)

    log = open_log(audit_dir, fsync=fsync)
    log.solo = lambda: True

    async def go() -> list[int]:
        seqs = []
        for i in range(5):
            r = await log.append({"event": "token.issued", "jti": str(i)})
            # Durable already: its fsync ran before append returned.
            assert log.stats.records == i + 1
            seqs.append(r.seq)
        return seqs

    assert asyncio.run(go()) == [1, 2, 3, 4, 5]
    assert calls == ["MainThread"] * 5
    log.solo = lambda: False
    asyncio.run(log.append({"event": "queued"}))
    assert calls[-1] == "badged-audit-writer"
    log.close()
    assert [r["seq"] for r in all_records(audit_dir)] == [1, 2, 3, 4, 5, 6]
    assert verify(audit_dir).ok


def _staggered_appends(log: AuditLog, n: int, gap: float) -> None:
    def one(i: int) -> None:
        log.append_sync({"event": "token.issued", "jti": str(i)})

    threads = []
    for i in range(n):
        t = threading.Thread(target=one, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(gap)
    for t in threads:
        t.join()


def test_under_load_the_writer_gathers_records_into_one_fsync(audit_dir: Path) -> None:
    """With many calls in flight, records arriving within commit_delay share a batch."""
    log = open_log(audit_dir)
    log.commit_delay = 0.5  # long, so a slow CI machine cannot split the batch
    log.in_flight = lambda: 10  # the front's hint: plenty of calls on their way
    _staggered_appends(log, 5, 0.04)
    assert log.stats.records == 5
    assert log.stats.batches <= 2  # 1 unless a thread started > 0.3 s late
    # Few calls in flight: no waiting, each record is written as it comes.
    log.in_flight = lambda: 2
    before = log.stats.batches
    _staggered_appends(log, 5, 0.04)
    assert log.stats.batches - before >= 4
    log.close()
    assert [r["seq"] for r in all_records(audit_dir)] == list(range(1, 11))
    assert verify(audit_dir).ok


def test_inline_and_writer_thread_appends_interleave_into_one_chain(audit_dir: Path) -> None:
    log = open_log(audit_dir)
    log.solo = lambda: True

    def worker(k: int) -> None:
        for i in range(40):
            log.append_sync({"event": "t", "who": k, "i": i})

    async def go() -> None:
        for i in range(80):
            await log.append({"event": "a", "i": i})

    _run_beside_threads(go, worker, 3)
    log.close()
    recs = all_records(audit_dir)
    assert [r["seq"] for r in recs] == list(range(1, 201))
    assert verify(audit_dir).ok


def test_inline_write_failure_fails_closed_and_the_log_recovers(audit_dir: Path) -> None:
    write = FaultyWrite()
    log = open_log(audit_dir, write=write)
    log.solo = lambda: True
    log.append_sync({"event": "a"})
    size = (audit_dir / file_name(1)).stat().st_size
    write.fail = True
    with pytest.raises(AuditError):
        asyncio.run(log.append({"event": "token.issued", "jti": "lost"}))
    assert (audit_dir / file_name(1)).stat().st_size == size
    write.fail = False
    r = asyncio.run(log.append({"event": "after"}))
    log.close()
    assert r.seq == 2
    assert [x["event"] for x in all_records(audit_dir)] == ["a", "after"]
    assert verify(audit_dir).ok
