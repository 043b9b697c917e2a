"""Crash recovery on open: a torn or invalid tail is cut, kept, and sealed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from badged.audit import AuditConfig, AuditLog, verify
from badged.audit.files import file_name, list_files
from badged.errors import ConfigError
from badged.keystore.port import KeyHandle
from tests.audit.helpers import all_records, build_log, log_lines, open_log, rewrite


def _recoveries(d: Path) -> list[dict[str, object]]:
    return [r for r in all_records(d) if r["kind"] == "recovery"]


def _reopen(d: Path, key: KeyHandle | None = None) -> None:
    log = open_log(d, signer=key)
    log.append_sync({"event": "daemon.start"})
    log.close()


TAILS: dict[str, Callable[[bytes], bytes]] = {
    "partial-json": lambda good: good[:37],
    "garbage-line": lambda good: b"\x00\x17garbage\n",
    "zero-filled": lambda good: b"\x00" * 300,
    "newline-missing": lambda good: good[:-1],
    "whole-record-then-partial": lambda good: good + good[:10],
}


@pytest.mark.parametrize("kind", list(TAILS))
def test_torn_tail_is_cut_saved_and_sealed(audit_dir: Path, mem_key: KeyHandle,
                                           kind: str) -> None:
    build_log(audit_dir, mem_key, n=8, every=100)  # seq 1..8 + close checkpoint 9
    path = audit_dir / file_name(1)
    before = path.read_bytes()
    # A record that "was being written" when the process died: seq 10.
    log = open_log(audit_dir)
    probe = log.append_sync({"event": "token.issued", "jti": "lost"})
    log.close()
    good = path.read_bytes()[len(before):]
    assert probe.seq == 10
    tail = TAILS[kind](good)
    path.write_bytes(before + tail)

    _reopen(audit_dir, mem_key)

    recs = all_records(audit_dir)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    [rec] = _recoveries(audit_dir)
    kept = good if kind == "whole-record-then-partial" else b""  # a complete record survives
    cut = tail[len(kept):]
    seq = 11 if kept else 10
    assert (rec["seq"], rec["line"], rec["offset"]) == (seq, seq, len(before) + len(kept))
    assert rec["cut_bytes"] == len(cut)
    assert rec["cut_sha256"] == hashlib.sha256(cut).hexdigest()
    saved = audit_dir / str(rec["moved_to"])
    assert saved.read_bytes() == cut  # evidence kept, never silently dropped
    assert not list(audit_dir.glob(".*.recover"))
    if kind == "newline-missing":
        assert rec["cut_seqs"] == [10, 10]
    report = verify(audit_dir, mem_key.public_key(), strict=True)
    assert report.ok, report.first_bad
    assert [b.seq for b in report.recoveries] == [seq]
    # Everything acknowledged before the crash is still there, unchanged.
    assert path.read_bytes().startswith(before)


def test_clean_log_gets_no_recovery_record(audit_dir: Path) -> None:
    build_log(audit_dir, None, n=5)
    _reopen(audit_dir)
    _reopen(audit_dir)
    assert _recoveries(audit_dir) == []


def test_invalid_unsealed_record_followed_by_valid_ones_is_cut_from_there(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    build_log(audit_dir, None, n=10)  # no checkpoint: nothing sealed
    [(path, lines)] = log_lines(audit_dir)
    lines[6] = lines[6].replace(b"agent", b"AGENT")  # seq 7 damaged
    rewrite(path, lines)
    _reopen(audit_dir, mem_key)
    [rec] = _recoveries(audit_dir)
    assert rec["seq"] == 7 and rec["cut_seqs"] == [8, 10]
    assert "hash" in str(rec["reason"]) and "sealed" not in rec
    assert verify(audit_dir, mem_key.public_key()).ok


def test_damaged_sealed_record_refuses_to_open_and_cuts_nothing(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    from badged.audit.log import AuditTamperedError

    build_log(audit_dir, mem_key, n=10, every=100)  # close checkpoint (seq 11) seals 1..10
    [(path, lines)] = log_lines(audit_dir)
    lines[6] = lines[6].replace(b"agent", b"AGENT")  # seq 7 damaged
    rewrite(path, lines)
    before = path.read_bytes()
    with pytest.raises(AuditTamperedError, match=r"seq 7\b.*checkpoint seq 11.*move-aside 7"):
        _reopen(audit_dir, mem_key)
    assert path.read_bytes() == before  # nothing cut, nothing appended
    assert not list(audit_dir.glob("*.cut-*"))
    # The operator's explicit answer: only the damaged seq itself is accepted.
    with pytest.raises(ConfigError, match=r"seq 7\b.*move-aside 7"):
        AuditLog.open(AuditConfig(directory=audit_dir), signer=mem_key, move_aside_sealed=8)
    log = AuditLog.open(AuditConfig(directory=audit_dir, checkpoint_seconds=None),
                        signer=mem_key, move_aside_sealed=7)
    log.close()
    [rec] = _recoveries(audit_dir)
    assert rec["sealed"] is True and rec["sealed_by"] == 11 and rec["seq"] == 7
    report = verify(audit_dir, mem_key.public_key())
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.code == "sealed_cut"


def test_garbage_last_file_after_rotation_links_to_previous_file(audit_dir: Path) -> None:
    build_log(audit_dir, None, n=30, rotate_bytes=1200)
    paths = list_files(audit_dir)
    assert len(paths) >= 2
    last_of_prev = json.loads(paths[-2].read_bytes().splitlines()[-1])
    paths[-1].write_bytes(b'{"seq":')
    _reopen(audit_dir)
    first = json.loads(paths[-1].read_bytes().splitlines()[0])
    assert first["kind"] == "recovery" and first["prev"] == last_of_prev["hash"]
    assert verify(audit_dir).ok


def test_empty_last_file_after_rotation_is_fine(audit_dir: Path) -> None:
    build_log(audit_dir, None, n=5)
    (audit_dir / file_name(6)).touch(mode=0o600)
    _reopen(audit_dir)
    assert _recoveries(audit_dir) == []
    assert verify(audit_dir).ok and all_records(audit_dir)[-1]["seq"] == 6


def test_crash_during_recovery_is_redone_exactly_once(audit_dir: Path) -> None:
    build_log(audit_dir, None, n=5)
    path = audit_dir / file_name(1)
    clean = path.read_bytes()
    path.write_bytes(clean + b'{"partial')
    # As if a previous recovery died after saving the cut and writing the temp
    # file but before the rename: the torn file is still in place.
    (audit_dir / f"{path.name}.cut-{len(clean)}").write_bytes(b'{"partial')
    (audit_dir / f".{path.name}.recover").write_bytes(clean + b"half a record")
    _reopen(audit_dir)
    assert len(_recoveries(audit_dir)) == 1
    assert not list(audit_dir.glob(".*.recover"))
    assert verify(audit_dir).ok


def test_tail_scan_fast_path_answers_exactly_as_the_record_path(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    """Start-up scans the last file with verify's chunk scanner (issue 22: ~40 µs a
    record made a 16 MiB tail cost ~1.5 s); where it answers, it must say what
    the record-by-record scan says, and it must refuse whatever needs a cut."""
    from badged.audit import log as log_mod

    build_log(audit_dir, mem_key, n=40, every=7)  # events and checkpoints, closing checkpoint
    path = audit_dir / file_name(1)
    fast = log_mod._scan_tail_fast(path)
    assert fast is not None and fast == log_mod._scan_tail_records(path)
    assert fast.head is not None and fast.head.kind == "checkpoint"  # the closing one
    assert fast.sealed_seq == fast.last_event_seq == fast.head.seq - 1
    assert fast.good_end == len(path.read_bytes())
    log = open_log(audit_dir)
    log.append_sync({"event": "token.issued", "jti": "last"})  # ends on an event
    log.close()
    fast = log_mod._scan_tail_fast(path)
    assert fast is not None and fast == log_mod._scan_tail_records(path)
    good = path.read_bytes()
    for tail in TAILS.values():
        path.write_bytes(good + tail(good.splitlines(keepends=True)[-1]))
        assert log_mod._scan_tail_fast(path) is None  # the record path finds the cut
        assert log_mod._scan_tail_records(path).reason is not None
    # A record changed in place (hash no longer matches) is refused too.
    lines = good.splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"event"', b'"evenT"')
    path.write_bytes(b"".join(lines))
    assert log_mod._scan_tail_fast(path) is None
    assert log_mod._scan_tail_records(path).reason is not None
    path.write_bytes(b"")
    assert log_mod._scan_tail_fast(path) == log_mod._scan_tail_records(path)
