"""[audit] durability = "write": written before the answer, synced in the background.

What the mode promises (docs/audit.md, "Durability modes"), each performed:

* a record is in the file (``write(2)``) before ``append`` returns, so a
  kill -9 of the daemon under load loses no acknowledged record;
* the appends themselves never sync: one background thread does, and it
  makes everything written durable (the sync state reaches the head);
* a checkpoint's bytes are written only after everything it seals was
  synced, so a power loss can tear an unsealed tail, never a sealed one;
* blocking appends (start/stop, key lifecycle) are still fsync'd before
  they return; a failed background sync fails every later append closed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from badged.audit import AuditConfig, verify
from badged.config import load_config
from badged.errors import AuditError, ConfigError
from badged.keystore.port import KeyHandle
from tests.audit.helpers import all_records, open_log

CHILD = Path(__file__).with_name("crash_child.py")


class SyncSpy:
    """A real ``os.fsync`` that records which thread called it, and when (op order)."""

    def __init__(self, ops: list[tuple[str, str]] | None = None) -> None:
        self.threads: list[str] = []
        self.ops = ops if ops is not None else []
        self.fail = False

    def fsync(self, fd: int) -> None:
        if self.fail:
            raise OSError(errno.EIO, "injected fsync failure")
        self.threads.append(threading.current_thread().name)
        self.ops.append(("fsync", ""))
        os.fsync(fd)

    def write(self, fd: int, data: bytes) -> int:
        self.ops.append(("write", data.decode(errors="replace")))
        return os.write(fd, data)


def _wait_synced(log: object, timeout: float = 60.0) -> None:
    """Until the sync state reaches the head (no speed assertion: a generous cap)."""
    from badged.audit import AuditLog

    assert isinstance(log, AuditLog)
    deadline = time.monotonic() + timeout
    while log.stats.synced_seq < log.head.seq:
        assert time.monotonic() < deadline, "the background sync never caught up"
        time.sleep(0.01)


async def _append_many(log: object, n: int, workers: int = 8) -> None:
    from badged.audit import AuditLog

    assert isinstance(log, AuditLog)

    async def worker(w: int) -> None:
        for i in range(n // workers):
            await log.append({"event": "token.issued", "agent": f"a{w}", "jti": f"{w}-{i}"})

    await asyncio.gather(*[worker(w) for w in range(workers)])


def test_appends_never_sync_and_the_background_sync_reaches_the_head(audit_dir: Path) -> None:
    spy = SyncSpy()
    log = open_log(audit_dir, durability="write", sync_delay=0.05, fsync=spy.fsync)
    try:
        opened = len(spy.threads)
        asyncio.run(_append_many(log, 400))
        assert log.stats.records == 400 == log.head.seq  # written and acknowledged
        _wait_synced(log)
        syncs = spy.threads[opened:]
        # Every sync after open came from the background thread, none from an append.
        assert syncs and set(syncs) == {"badged-audit-sync"}, syncs
        assert log.stats.syncs == len(syncs)
        assert log.stats.synced_seq == log.head.seq == 400
    finally:
        log.close()


def test_fsync_mode_still_syncs_on_the_append_path(audit_dir: Path) -> None:
    """The control: the default mode's appends sync before they return."""
    spy = SyncSpy()
    log = open_log(audit_dir, fsync=spy.fsync)
    try:
        asyncio.run(_append_many(log, 40))
        assert log.stats.synced_seq == 40
        assert spy.threads and "badged-audit-sync" not in spy.threads
        assert log.stats.syncs == 0
    finally:
        log.close()


def test_a_checkpoint_is_written_only_after_what_it_seals_is_synced(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    spy = SyncSpy()
    log = open_log(audit_dir, signer=mem_key, durability="write", sync_delay=1.0,
                   fsync=spy.fsync, write=spy.write)

    async def run() -> None:
        for i in range(5):
            await log.append({"event": "token.issued", "agent": "a", "jti": f"j{i}"})
        await log.checkpoint()

    try:
        asyncio.run(run())
        i = next(n for n, (op, data) in enumerate(spy.ops)
                 if op == "write" and '"audit.checkpoint"' in data)
        assert spy.ops[i - 1][0] == "fsync", spy.ops[max(0, i - 3):i + 1]  # sealed ones first
        assert any(op == "write" and "j4" in d for op, d in spy.ops[:i - 1])
        assert spy.ops[i + 1][0] == "fsync"  # and the checkpoint itself is durable
        assert log.stats.synced_seq == log.head.seq
    finally:
        log.close()


def test_blocking_appends_are_durable_before_they_return(audit_dir: Path) -> None:
    spy = SyncSpy()
    log = open_log(audit_dir, durability="write", sync_delay=1.0, fsync=spy.fsync)
    try:
        before = len(spy.threads)
        receipt = log.append_sync({"event": "key.created", "key": "k", "reason": "test"})
        assert len(spy.threads) > before
        assert log.stats.synced_seq >= receipt.seq
    finally:
        log.close()


def test_a_failed_background_sync_fails_later_appends_closed(audit_dir: Path) -> None:
    spy = SyncSpy()
    log = open_log(audit_dir, durability="write", sync_delay=0.01, fsync=spy.fsync)

    async def run() -> None:
        await log.append({"event": "token.issued", "agent": "a", "jti": "ok"})
        deadline = time.monotonic() + 60
        while log.problem is None:
            assert time.monotonic() < deadline, "the failed sync did not poison the log"
            await asyncio.sleep(0.01)
        with pytest.raises(AuditError):
            await log.append({"event": "token.issued", "agent": "a", "jti": "after"})

    spy.fail = True
    try:
        asyncio.run(run())
        assert log.stats.synced_seq == 0
    finally:
        spy.fail = False
        log.close()


def test_close_syncs_what_was_written(audit_dir: Path) -> None:
    log = open_log(audit_dir, durability="write", sync_delay=1.0)
    asyncio.run(_append_many(log, 16))
    log.close()
    assert log.stats.synced_seq == 16


def test_config_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        AuditConfig(directory=tmp_path, durability="never")
    with pytest.raises(ConfigError):
        AuditConfig(directory=tmp_path, durability="write", sync_delay=5.0)
    p = tmp_path / "badged.toml"
    p.write_text('[keystore]\nuri = "pkcs11:token=x"\n[audit]\ndurability = "write"\n'
                 "sync_delay_ms = 20\n")
    cfg = load_config(p)
    assert (cfg.audit_durability, cfg.audit_sync_delay_ms) == ("write", 20)
    p.write_text('[keystore]\nuri = "pkcs11:token=x"\n[audit]\ndurability = "later"\n')
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert "durability" in str(info.value)
    assert load_config(_default(tmp_path)).audit_durability == "fsync"


def _default(tmp_path: Path) -> Path:
    p = tmp_path / "default.toml"
    p.write_text('[keystore]\nuri = "pkcs11:token=x"\n')
    return p


def _run_and_kill(directory: Path, key_pem: Path, run: int, rng: random.Random,
                  acked: dict[int, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(directory), str(key_pem), str(run), "8", "write"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    target = rng.randint(20, 400)
    lines: list[bytes] = []
    try:
        while len(lines) <= target:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    for line in [*lines, *rest.splitlines(keepends=True)]:
        if not line.endswith(b"\n") or line == b"ready\n":
            continue
        seq, jti = line.decode().split()
        acked[int(seq)] = jti


@pytest.mark.slow
def test_write_mode_kill_9_under_load_loses_no_acknowledged_record(audit_dir: Path) -> None:
    """The daemon-crash half of the promise, with a 1 s sync delay: most acks unsynced."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = audit_dir.parent / "key.pem"
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    audit_dir.mkdir(mode=0o700)
    acked: dict[int, str] = {}
    for run in range(5):
        _run_and_kill(audit_dir, key_pem, run, rng, acked)
        report = verify(audit_dir, key.public_key())
        assert report.ok, f"seed={seed} run={run}: {report.first_bad}"
    open_log(audit_dir).close()
    report = verify(audit_dir, key.public_key())
    assert report.ok, f"seed={seed}: {report.first_bad}"
    by_seq = {r["seq"]: r for r in all_records(audit_dir)}
    missing = {s: j for s, j in acked.items() if by_seq.get(s, {}).get("jti") != j}
    assert not missing, f"seed={seed}: acknowledged but not in the log: {missing}"
    assert len(acked) >= 5 * 20
