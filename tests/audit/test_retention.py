"""Retention: the oldest sealed files go, each removal is audited and verifiable.

Real files in a real directory, the real writer (rotation, checkpoints signed
by a device key) and the offline verifier. The attack test deletes a file by
hand, as someone with write access to the audit directory would, and fails
if verify still passes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from badged.audit.files import list_files
from badged.audit.log import AuditConfig, AuditLog
from badged.audit.verify import verify
from badged.config import load_config
from badged.errors import ConfigError
from badged.keystore.port import KeyHandle
from tests.audit.helpers import FakeClock, all_records, open_log

ROTATE = 600  # bytes: a new file every few records


def _fill(log: AuditLog, n: int, *, every: int = 4, start: int = 0) -> None:
    """n events with a signed checkpoint after every ``every``: many sealed files."""
    for i in range(start + 1, start + n + 1):
        log.append_sync({"event": "token.denied", "agent": "a", "reason": "no rule", "n": i})
        if i % every == 0:
            log.checkpoint_sync()


def _pruned(directory: Path) -> list[dict[str, Any]]:
    """The audit.pruned records; [] while the retention thread is removing a file we listed."""
    try:
        return [r for r in all_records(directory) if r.get("event") == "audit.pruned"]
    except FileNotFoundError:  # pruned between the listing and the read: poll again
        return []


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in list_files(directory))


def test_oldest_sealed_files_are_removed_audited_and_verify_passes(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=ROTATE, retain_bytes=3000)
    _fill(log, 60)
    before = list_files(audit_dir)
    assert _size(audit_dir) > 3000 and len(before) > 6
    newest = before[-2:]
    removed = log.run_retention()
    after = list_files(audit_dir)
    assert removed, "nothing was pruned over the limit"
    assert [r.file for r in removed] == [p.name for p in before[: len(removed)]]  # oldest first
    assert all(p in after for p in newest)  # the newest files are kept
    # what was there before is back within the limit (the audit.pruned records
    # themselves go to the live file, which is never a candidate)
    assert sum(p.stat().st_size for p in before if p in after) <= 3000
    records = _pruned(audit_dir)
    assert [r["file"] for r in records] == [r.file for r in removed]
    first_left = json.loads(after[0].read_bytes().splitlines()[0])
    last = records[-1]
    assert last["last_seq"] == first_left["seq"] - 1
    assert last["last_hash"] == first_left["prev"]
    assert isinstance(last["sealed_by"], int) and last["sealed_by"] > last["last_seq"]
    report = verify(audit_dir, mem_key.public_key())
    assert report.ok, report.summary()
    assert report.pruned_to == last["last_seq"]
    assert "removed by retention" in report.summary()
    log.close()  # the close checkpoint seals the audit.pruned records too
    assert verify(audit_dir, mem_key.public_key(), strict=True).ok


def test_file_deleted_by_hand_without_a_pruned_record_fails_verify(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    """The attack: remove the oldest history without the daemon. Verify must fail."""
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=ROTATE)
    _fill(log, 30)
    log.close()
    assert verify(audit_dir, mem_key.public_key()).ok
    list_files(audit_dir)[0].unlink()
    report = verify(audit_dir, mem_key.public_key())
    assert not report.ok
    assert report.first_bad is not None and report.first_bad.code == "seq_gap"


def test_deleting_one_more_file_after_pruning_fails_verify(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    """A prune record vouches for exactly its boundary, not for anything older-looking."""
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=ROTATE, retain_bytes=4000)
    _fill(log, 60)
    assert log.run_retention()
    log.close()
    assert verify(audit_dir, mem_key.public_key(), strict=True).ok
    list_files(audit_dir)[0].unlink()
    report = verify(audit_dir, mem_key.public_key())
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.code == "seq_gap"


def test_export_dir_receives_the_file_before_it_is_deleted(
        audit_dir: Path, mem_key: KeyHandle, tmp_path: Path) -> None:
    export = tmp_path / "export"
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=ROTATE, retain_bytes=3000,
                   export_dir=export)
    _fill(log, 60)
    originals = {p.name: p.read_bytes() for p in list_files(audit_dir)}
    removed = log.run_retention()
    log.close()
    assert removed
    for r in removed:
        assert (export / r.file).read_bytes() == originals[r.file]
        assert r.exported_to == str(export / r.file)
    assert [r["exported_to"] for r in _pruned(audit_dir)] == [r.exported_to for r in removed]
    assert verify(audit_dir, mem_key.public_key(), strict=True).ok


def test_failed_export_deletes_nothing(audit_dir: Path, mem_key: KeyHandle,
                                       tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=ROTATE, retain_bytes=3000,
                   export_dir=blocker / "export")
    _fill(log, 60)
    before = list_files(audit_dir)
    assert log.run_retention() == []
    log.close()
    assert list_files(audit_dir) == before
    assert _pruned(audit_dir) == []


def test_unsealed_files_are_never_pruned(audit_dir: Path, mem_key: KeyHandle) -> None:
    """Files after the last checkpoint stay, however far over the limit."""
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=ROTATE, retain_bytes=1)
    _fill(log, 8)  # sealed up to seq ~10
    sealed_files = len(list_files(audit_dir))
    _fill(log, 40, every=10_000, start=8)  # many more files, none sealed
    files_before = list_files(audit_dir)
    removed = log.run_retention()
    remaining = list_files(audit_dir)
    assert len(removed) < sealed_files  # at most the sealed prefix went
    sealed_by = {r["file"]: r["sealed_by"] for r in _pruned(audit_dir)}
    for r in removed:
        assert sealed_by[r.file] > r.last_seq
    # every file holding a record past the last checkpoint is still there
    assert files_before[len(removed):] == remaining[: len(files_before) - len(removed)]
    assert len(remaining) >= len(files_before) - sealed_files
    log.close()
    assert verify(audit_dir, mem_key.public_key(), strict=True).ok


def test_without_a_signer_nothing_is_sealed_so_nothing_is_pruned(audit_dir: Path) -> None:
    log = open_log(audit_dir, rotate_bytes=ROTATE, retain_bytes=1)
    _fill(log, 40)
    before = list_files(audit_dir)
    assert log.run_retention() == []
    log.close()
    assert list_files(audit_dir) == before


def test_age_limit_removes_only_files_older_than_retain_days(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    clock = FakeClock()
    log = open_log(audit_dir, signer=mem_key, clock=clock, rotate_bytes=ROTATE, retain_days=1)
    _fill(log, 30)
    old = list_files(audit_dir)
    assert log.run_retention() == []  # nothing is a day old yet
    clock.now += 2 * 86400
    _fill(log, 30, start=30)
    removed = log.run_retention()
    log.close()
    assert [r.file for r in removed] == [p.name for p in old[: len(removed)]]
    assert len(removed) >= len(old) - 2
    assert {r["reason"] for r in _pruned(audit_dir)} == {"retain_days"}
    assert verify(audit_dir, mem_key.public_key(), strict=True).ok


def test_the_daemon_timer_prunes_off_the_request_path(audit_dir: Path,
                                                      mem_key: KeyHandle) -> None:
    """Appends from the loop arm the monotonic timer; the work runs on a thread."""

    async def run() -> int:
        log = AuditLog.open(AuditConfig(directory=audit_dir, rotate_bytes=ROTATE,
                                        retain_bytes=3000, retain_check_seconds=0.05,
                                        checkpoint_records=4, checkpoint_seconds=None),
                            signer=mem_key)
        for i in range(80):
            await log.append({"event": "token.denied", "n": i})
            await asyncio.sleep(0)
        for _ in range(100):
            if _pruned(audit_dir):
                break
            await asyncio.sleep(0.05)
        await log.aclose()
        return len(_pruned(audit_dir))

    assert asyncio.run(run()) > 0
    assert verify(audit_dir, mem_key.public_key(), strict=True).ok


def test_pruning_survives_a_restart(audit_dir: Path, mem_key: KeyHandle) -> None:
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=ROTATE, retain_bytes=3000)
    _fill(log, 60)
    assert log.run_retention()
    log.close()
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=ROTATE, retain_bytes=3000)
    _fill(log, 40, start=60)
    assert log.run_retention()
    log.close()
    report = verify(audit_dir, mem_key.public_key(), strict=True)
    assert report.ok, report.summary()
    assert report.prunes >= 2


def test_config_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        AuditConfig(directory=tmp_path, retain_bytes=-1)
    p = tmp_path / "badged.toml"
    base = '[keystore]\nuri = "pkcs11:token=x"\n[audit]\n'
    p.write_text(base + 'retain_bytes = 1000000\nretain_days = 90\n'
                 'export_dir = "/var/backups/audit"\n')
    cfg = load_config(p)
    assert (cfg.audit_retain_bytes, cfg.audit_retain_days) == (1_000_000, 90)
    assert cfg.audit_export_dir == Path("/var/backups/audit")
    for bad in ('retain_bytes = "1G"', "retain_days = 1.5", "retain_days = -1",
                'export_dir = "relative"', "retain_bytes = true"):
        p.write_text(base + bad + "\n")
        with pytest.raises(ConfigError):
            load_config(p)
    p.write_text('[keystore]\nuri = "pkcs11:token=x"\n')
    cfg = load_config(p)
    assert (cfg.audit_retain_bytes, cfg.audit_retain_days, cfg.audit_export_dir) == (0, 0, None)


def test_an_idle_log_applies_the_limit_once_started(audit_dir: Path, mem_key: KeyHandle) -> None:
    """The daemon arms the timer at start: no request is needed for retention to run."""
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=ROTATE)
    _fill(log, 60)
    log.close()

    async def run() -> int:
        log = AuditLog.open(AuditConfig(directory=audit_dir, rotate_bytes=ROTATE,
                                        retain_bytes=3000, retain_check_seconds=0.05,
                                        checkpoint_records=None, checkpoint_seconds=None),
                            signer=mem_key)
        log.start_retention(asyncio.get_running_loop())
        for _ in range(100):
            if _pruned(audit_dir):
                break
            await asyncio.sleep(0.05)
        await log.aclose()
        return len(_pruned(audit_dir))

    assert asyncio.run(run()) > 0
    assert verify(audit_dir, mem_key.public_key(), strict=True).ok


def test_badgectl_audit_verify_reports_the_pruned_range(audit_dir: Path, mem_key: KeyHandle,
                                                        tmp_path: Path) -> None:
    from click.testing import CliRunner
    from cryptography.hazmat.primitives import serialization

    from badgeclient._cli.audit import audit_group

    pem = tmp_path / "device.pem"
    pem.write_bytes(mem_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=ROTATE, retain_bytes=3000)
    _fill(log, 60)
    removed = log.run_retention()
    log.close()
    args = ["verify", "--strict", "--dir", str(audit_dir), "--pubkey", str(pem)]
    result = CliRunner().invoke(audit_group, args)
    assert result.exit_code == 0, result.output
    assert f"seq 1..{removed[-1].last_seq} removed by retention" in result.output
    list_files(audit_dir)[0].unlink()  # one more, by hand
    result = CliRunner().invoke(audit_group, args)
    assert result.exit_code == 1 and "seq_gap" in result.output
