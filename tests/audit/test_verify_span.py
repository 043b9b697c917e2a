"""Span hashes: each checkpoint signs the SHA-256 of the exact bytes it seals.

The writer keeps one running SHA-256 over the lines it chains since the last
checkpoint's head (or its own first line), and the next checkpoint signs it
with ``span_from`` (the span's first seq) next to its head. These tests read
the written files back and recompute every span from the bytes, across
rotation, a restart and a crash recovery; then they attack the spans
(docs/audit.md, "Span hashes"; threat model D235). Whole reports are
compared between the fast path and the record-by-record reference as in
tests/audit/test_verify_fast.py.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.audit import verify
from badged.audit.files import list_files
from badged.audit.record import checkpoint_statement, seal
from badged.keystore.port import KeyHandle
from tests.audit.helpers import log_lines, open_log, rewrite

_vm = sys.modules["badged.audit.verify"]


def _both(d: Path, key: KeyHandle | None, *, jobs: int = 1, **kw: Any) -> Any:
    """Verify fast and record by record; the whole reports must be equal."""
    pub = key.public_key() if key is not None else None
    ref = verify(d, pub, fast=False, **kw)
    fast = verify(d, pub, jobs=jobs, **kw)
    assert asdict(fast) == asdict(ref), (fast.summary(), ref.summary())
    return ref


def _lines(d: Path) -> list[tuple[int, bytes, dict[str, Any]]]:
    """(seq, exact line bytes, record) of every line of every file, in order."""
    out = []
    for _p, lines in log_lines(d):
        for raw in lines:
            rec = json.loads(raw)
            out.append((rec["seq"], raw, rec))
    return out


def _fill(log: Any, first: int, n: int) -> None:
    for i in range(first, first + n):
        log.append_sync({"event": "token.issued", "agent": f"agent-{i % 3}", "jti": f"j{i}"})


def _build(d: Path, key: KeyHandle, *, rotate_bytes: int = 1 << 24, restarts: int = 1,
           n: int = 60, every: int = 10) -> None:
    """``restarts + 1`` processes' worth of events, a checkpoint every ``every``."""
    for run in range(restarts + 1):
        log = open_log(d, signer=key, rotate_bytes=rotate_bytes)
        for i in range(n):
            _fill(log, run * n + i, 1)
            if (i + 1) % every == 0:
                log.checkpoint_sync()
        log.close()


def _sign(key: KeyHandle, rec: dict[str, Any]) -> bytes:
    """A line as the device key's holder could write it (re-signed, re-hashed)."""
    rec = dict(rec)
    rec.pop("hash", None)
    rec["sig"] = base64.b64encode(key.sign(checkpoint_statement(rec),
                                           ec.ECDSA(hashes.SHA256()))).decode()
    return seal(rec)[1]


# -- the writer -------------------------------------------------------------------


def test_every_checkpoint_signs_the_bytes_of_its_span(audit_dir: Path, mem_key: KeyHandle) -> None:
    """Across rotation and a restart, each span is exactly the bytes of its lines."""
    _build(audit_dir, mem_key, rotate_bytes=4000, restarts=1)
    assert len(list_files(audit_dir)) >= 4
    lines = _lines(audit_dir)
    by_seq = {seq: raw for seq, raw, _rec in lines}
    cps = [rec for _seq, _raw, rec in lines if rec["kind"] == "checkpoint"]
    assert len(cps) >= 12 and all("span_sha256" in c for c in cps)
    starts = []
    for c in cps:
        span = b"".join(by_seq[s] for s in range(c["span_from"], c["head_seq"] + 1))
        assert hashlib.sha256(span).hexdigest() == c["span_sha256"]
        starts.append(c["span_from"])
    # Within a process spans follow each other: the next starts after the
    # head. The restarted process (its first checkpoint is the 7th: 6 per
    # process, the 6th the first process's last line) starts its own first
    # span at its own first line.
    assert starts[0] == 1
    for i, (prev, c) in enumerate(itertools.pairwise(cps), start=1):
        if i == 6:
            assert c["span_from"] == prev["seq"] + 1 == lines[-1][0] // 2 + 1
        else:
            assert c["span_from"] == prev["head_seq"] + 1
    assert _both(audit_dir, mem_key, strict=True).ok


def test_a_recovery_record_is_outside_the_next_span(audit_dir: Path, mem_key: KeyHandle) -> None:
    _build(audit_dir, mem_key, restarts=0, n=20)
    log = open_log(audit_dir, signer=mem_key)
    _fill(log, 100, 3)
    log._fsync(log._fd)  # a crash: no close(), no checkpoint
    log._release_lock()
    path = list_files(audit_dir)[-1]
    path.write_bytes(path.read_bytes() + b'{"torn')
    log = open_log(audit_dir, signer=mem_key)
    _fill(log, 200, 5)
    log.checkpoint_sync()
    log.close()
    lines = _lines(audit_dir)
    recovery = next(rec for _s, _r, rec in lines if rec["kind"] == "recovery")
    cp = [rec for _s, _r, rec in lines if rec["kind"] == "checkpoint"][-1]
    assert cp["span_from"] == recovery["seq"] + 1
    report = _both(audit_dir, mem_key)
    assert report.ok and len(report.recoveries) == 1


def test_a_write_failure_drops_the_span_and_the_next_checkpoint_starts_one(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    fail = {"on": False}

    def write(fd: int, data: bytes) -> int:
        if fail["on"]:
            raise OSError(28, "No space left on device")
        import os
        return os.write(fd, data)

    log = open_log(audit_dir, signer=mem_key, write=write)
    _fill(log, 0, 5)
    fail["on"] = True
    with pytest.raises(Exception):  # noqa: B017 -- AuditError, whatever its wording
        _fill(log, 5, 1)
    fail["on"] = False
    _fill(log, 6, 3)
    first = log.checkpoint_sync()  # the span hashed a discarded line: none signed
    _fill(log, 9, 3)
    second = log.checkpoint_sync()
    log.close()
    assert first is not None and second is not None
    recs = {rec["seq"]: rec for _s, _r, rec in _lines(audit_dir)}
    assert "span_sha256" not in recs[first.seq]
    assert recs[second.seq]["span_from"] == recs[first.seq]["head_seq"] + 1
    assert _both(audit_dir, mem_key, strict=True).ok


# -- attacks on the signed fields -------------------------------------------------


def test_span_fields_stripped_or_forged_break_the_signature(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    """Without the key, span_from/span_sha256 can be neither removed nor changed."""
    for change in ({"span_from": None}, {"span_from": 2}, {"span_sha256": "0" * 64}):
        d = audit_dir / str(len(list(audit_dir.parent.iterdir())))
        _build(d, mem_key, restarts=0, n=30)
        path = list_files(d)[-1]
        raw = path.read_bytes().splitlines(keepends=True)
        last = json.loads(raw[-1])
        assert last["kind"] == "checkpoint"
        for name, value in change.items():
            if value is None:
                last.pop(name)
            else:
                last[name] = value
        last.pop("hash")
        raw[-1] = seal(last)[1]  # a valid record hash, as anyone can make
        rewrite(path, raw)
        report = _both(d, mem_key)
        assert not report.ok and report.first_bad is not None
        assert report.first_bad.code == "checkpoint_bad_signature", report.first_bad


def test_a_signed_span_that_does_not_match_is_a_finding(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    """The record path checks the span too: a key holder's (or a writer bug's)
    wrong span is reported, not silently sealed."""
    _build(audit_dir, mem_key, restarts=0, n=30)
    path = list_files(audit_dir)[-1]
    raw = path.read_bytes().splitlines(keepends=True)
    last = json.loads(raw[-1])
    last["span_from"] += 1  # the span now misses its first line
    raw[-1] = _sign(mem_key, last)
    rewrite(path, raw)
    report = _both(audit_dir, mem_key)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.code == "checkpoint_span_mismatch", report.first_bad
    assert report.first_bad.seq == last["seq"]


def test_an_invalid_span_field_is_malformed(audit_dir: Path, mem_key: KeyHandle) -> None:
    _build(audit_dir, mem_key, restarts=0, n=30)
    path = list_files(audit_dir)[-1]
    raw = path.read_bytes().splitlines(keepends=True)
    last = json.loads(raw[-1])
    last["span_from"] = last["head_seq"] + 1
    raw[-1] = _sign(mem_key, last)
    rewrite(path, raw)
    report = _both(audit_dir, mem_key)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.code == "malformed", report.first_bad


def test_an_old_format_log_verifies_as_before(audit_dir: Path, mem_key: KeyHandle) -> None:
    """Checkpoints without span fields (written before them) keep verifying."""
    _build(audit_dir, mem_key, rotate_bytes=4000, restarts=0, n=40)
    ref = verify(audit_dir, mem_key.public_key(), fast=False, strict=True)
    prev = "0" * 64
    new: dict[int, str] = {}
    for path, raw in log_lines(audit_dir):
        out = []
        for line in raw:
            rec = json.loads(line)
            rec["prev"] = prev
            rec.pop("hash")
            if rec["kind"] == "checkpoint":
                rec["head"] = new[rec["head_seq"]]
                rec.pop("span_from")
                rec.pop("span_sha256")
                rec.pop("sig")
                rec = json.loads(_sign(mem_key, rec))
                rec.pop("hash")
            out.append(seal(rec)[1])
            prev = new[rec["seq"]] = json.loads(out[-1])["hash"]
        rewrite(path, out)
    assert b"span_sha256" not in b"".join(p.read_bytes() for p in list_files(audit_dir))
    old = _both(audit_dir, mem_key, strict=True)
    assert old.ok and asdict(old) | {"head": None} == asdict(ref) | {"head": None}


# -- attacks on the fast path's span proof ----------------------------------------


def _spanned(d: Path, key: KeyHandle) -> list[int]:
    """Records each file's scan proved by span hashes (-1: the file took the record path)."""
    der = _vm._public_der(key.public_key())
    out = []
    for p in list_files(d):
        scan = _vm._scan_file(str(p), 200_000, der)
        out.append(-1 if scan is None else scan.spanned)
    return out


@pytest.fixture
def span_log(audit_dir: Path, mem_key: KeyHandle) -> Path:
    """Two processes, ~130 lines each, 4+ files, a checkpoint every 10 events;
    most of every file is proved by span hashes (checked here)."""
    _build(audit_dir, mem_key, rotate_bytes=12_000, restarts=1, n=120)
    spanned = _spanned(audit_dir, mem_key)
    assert len(spanned) >= 4 and min(spanned) > 0 and sum(spanned) > 150, spanned
    return audit_dir


def _file_lines(d: Path, index: int) -> tuple[Path, list[bytes]]:
    path = list_files(d)[index]
    return path, path.read_bytes().splitlines(keepends=True)


def _inside_a_span(lines: list[bytes]) -> int:
    """Index of an event line that a checkpoint later in the same file spans."""
    recs = [json.loads(raw) for raw in lines]
    for cp in reversed(recs):
        if cp["kind"] == "checkpoint" and cp.get("span_from", 0) >= recs[0]["seq"]:
            for i, rec in enumerate(recs):
                if cp["span_from"] < rec["seq"] < cp["head_seq"] and rec["kind"] == "event":
                    return i
    raise AssertionError("no spanned event in this file")


def test_a_clean_log_is_proved_by_span_hashes(span_log: Path, mem_key: KeyHandle) -> None:
    report = _both(span_log, mem_key, strict=True)
    assert report.ok and report.unsealed == 0 and report.checkpoints >= 24
    _both(span_log, mem_key, jobs=2)
    _both(span_log, mem_key, window=5)  # heads out of the window: counted the same
    _both(span_log, mem_key, from_seq=100)
    _both(span_log, None)


@pytest.mark.parametrize("where", [0, 2, -1])
def test_a_byte_changed_inside_a_span_is_found(span_log: Path, mem_key: KeyHandle,
                                              where: int) -> None:
    path, lines = _file_lines(span_log, where)
    i = _inside_a_span(lines)
    lines[i] = lines[i].replace(b'"agent-', b'"agent_', 1)
    rewrite(path, lines)
    assert _spanned(span_log, mem_key)[where] == -1  # the fast path declined the file
    report = _both(span_log, mem_key)
    assert not report.ok and report.first_bad is not None
    assert (report.first_bad.file, report.first_bad.line) == (path.name, i + 1)


def test_a_line_with_a_recomputed_hash_inside_a_span_is_found(
        span_log: Path, mem_key: KeyHandle) -> None:
    path, lines = _file_lines(span_log, 1)
    i = _inside_a_span(lines)
    rec = json.loads(lines[i])
    rec["agent"] = "mallory"
    rec.pop("hash")
    lines[i] = seal(rec)[1]
    rewrite(path, lines)
    report = _both(span_log, mem_key)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.code == "chain_broken" and report.first_bad.line == i + 2


@pytest.mark.parametrize("how", ["insert", "remove"])
def test_a_line_inserted_or_removed_inside_a_span_is_found(
        span_log: Path, mem_key: KeyHandle, how: str) -> None:
    path, lines = _file_lines(span_log, 2)
    i = _inside_a_span(lines)
    if how == "insert":
        lines.insert(i, lines[i])
    else:
        del lines[i]
    rewrite(path, lines)
    report = _both(span_log, mem_key)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.code in {"seq_order", "seq_gap"}


@pytest.mark.parametrize("step", [-1, 1])
def test_a_checkpoint_line_moved_by_one_line_is_found(
        span_log: Path, mem_key: KeyHandle, step: int) -> None:
    """The span boundary shifted: a checkpoint swapped with its neighbour."""
    path, lines = _file_lines(span_log, 1)
    recs = [json.loads(raw) for raw in lines]
    i = next(j for j, r in enumerate(recs[1:-1], start=1) if r["kind"] == "checkpoint"
             and recs[j + step]["kind"] == "event")
    lines[i], lines[i + step] = lines[i + step], lines[i]
    rewrite(path, lines)
    report = _both(span_log, mem_key)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.code in {"seq_order", "seq_gap"}


def test_a_genuine_checkpoint_from_another_position_is_found(
        span_log: Path, mem_key: KeyHandle) -> None:
    """An earlier genuine checkpoint, re-linked to stand in for a later one."""
    path, lines = _file_lines(span_log, 2)
    recs = [json.loads(raw) for raw in lines]
    cps = [j for j, r in enumerate(recs) if r["kind"] == "checkpoint"]
    early, late = cps[0], cps[-1]
    rec = dict(recs[early])
    rec.update(seq=recs[late]["seq"], prev=recs[late]["prev"])  # fits the chain again
    rec.pop("hash")
    lines[late] = seal(rec)[1]
    if late + 1 < len(lines):  # the next line links to the new hash (as anyone can)
        nxt = json.loads(lines[late + 1])
        nxt["prev"] = json.loads(lines[late])["hash"]
        nxt.pop("hash")
        lines[late + 1] = seal(nxt)[1]
    rewrite(path, lines)
    report = _both(span_log, mem_key)
    assert not report.ok


def test_a_file_from_another_log_under_the_same_key_is_found(
        span_log: Path, tmp_path: Path, mem_key: KeyHandle) -> None:
    """Genuine spans and checkpoints, signed by the same key, in the wrong log."""
    other = tmp_path / "other"
    _build(other, mem_key, rotate_bytes=12_000, restarts=1, n=120)
    victim = list_files(span_log)[2]
    victim.write_bytes(list_files(other)[2].read_bytes())
    report = _both(span_log, mem_key)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.file == victim.name


def test_a_forged_unsealed_tail_is_reported_as_before(span_log: Path, mem_key: KeyHandle) -> None:
    """After the last checkpoint nothing is signed: a forged record there passes as an
    unsealed record (and fails --strict), exactly as without span hashes."""
    path, lines = _file_lines(span_log, -1)
    last = json.loads(lines[-1])
    forged = {"event": "token.issued", "agent": "mallory", "kind": "event",
              "seq": last["seq"] + 1, "prev": last["hash"], "time": last["time"]}
    lines.append(seal(forged)[1])
    rewrite(path, lines)
    report = _both(span_log, mem_key)
    assert report.ok and report.unsealed == 1
    strict = _both(span_log, mem_key, strict=True)
    assert not strict.ok and strict.first_bad is not None
    assert strict.first_bad.code == "unsealed_tail"


@pytest.mark.parametrize("cut", ["tail", "middle"])
def test_truncation_is_found(span_log: Path, mem_key: KeyHandle, cut: str) -> None:
    """Cut inside a span: in the middle of the log the chain breaks; at its end the
    records after the last checkpoint left are unsealed (as before span hashes, a
    cut exactly after a checkpoint line is what the log alone cannot show)."""
    path, lines = _file_lines(span_log, 1 if cut == "middle" else -1)
    i = _inside_a_span(lines)
    rewrite(path, lines[:i + 1])
    report = _both(span_log, mem_key, strict=True)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.code == ("seq_gap" if cut == "middle" else "unsealed_tail")


def test_the_line_before_a_span_must_link_to_it(audit_dir: Path, mem_key: KeyHandle) -> None:
    """A daemon that crashed leaves unsealed records; the next one's first span
    starts right after them. One of them re-hashed (as anyone can) is checked on
    its own and no longer links to the span's first line, whose bytes are proved."""
    _build(audit_dir, mem_key, restarts=0, n=20)
    log = open_log(audit_dir, signer=mem_key)
    _fill(log, 100, 3)
    log._release_lock()  # a crash: no close(), no checkpoint (nothing torn)
    log = open_log(audit_dir, signer=mem_key)
    _fill(log, 200, 20)
    log.checkpoint_sync()
    log.close()
    path, lines = _file_lines(audit_dir, 0)
    recs = [json.loads(raw) for raw in lines]
    span = [r for r in recs if r["kind"] == "checkpoint"][-1]
    i = span["span_from"] - recs[0]["seq"] - 1
    assert recs[i]["kind"] == "event" and i > 20
    assert _spanned(audit_dir, mem_key) == [span["head_seq"] - span["span_from"] + 1 + 21]
    rec = recs[i]
    rec["agent"] = "mallory"
    rec.pop("hash")
    lines[i] = seal(rec)[1]
    rewrite(path, lines)
    report = _both(audit_dir, mem_key)
    assert not report.ok and report.first_bad is not None
    assert (report.first_bad.code, report.first_bad.line) == ("chain_broken", i + 2)


def test_stretches_the_span_path_leaves_to_the_others_agree(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    """A retention record, a clock step and a nested "hash" member inside spans:
    those stretches go to the byte and parsing paths; the reports still agree."""
    from tests.audit.helpers import FakeClock

    clock = FakeClock()
    log = open_log(audit_dir, signer=mem_key, clock=clock, rotate_bytes=12_000)
    for i in range(90):
        fields: dict[str, Any] = {"event": "token.issued", "agent": f"agent-{i % 3}"}
        if i == 15:
            fields = {"event": "audit.pruned", "file": "audit-x.jsonl", "last_seq": 1,
                      "last_hash": "0" * 64}
        if i == 35:
            clock.now -= 5.0  # the clock steps back: a clock_backwards_s record
        if i == 55:
            fields["context"] = {"hash": "ab" * 32}
        log.append_sync(fields)
        if (i + 1) % 10 == 0:
            log.checkpoint_sync()
    log.close()
    spanned = _spanned(audit_dir, mem_key)
    assert -1 not in spanned and sum(spanned) > 0
    report = _both(audit_dir, mem_key, strict=True)
    assert report.ok and report.prunes == 1 and report.clock_steps_back == 1


@pytest.mark.parametrize("where", ["same file", "file before"])
def test_a_head_inside_a_proved_stretch_is_answered_exactly(
        span_log: Path, mem_key: KeyHandle, where: str) -> None:
    """The span path keeps no hashes inside a stretch, only its head's; a
    checkpoint naming a head inside one (no daemon writes that; here the key
    holder does) is answered by the record path, with the same report."""
    index = -1 if where == "same file" else -2
    _path, lines = _file_lines(span_log, index)
    target = json.loads(lines[_inside_a_span(lines)])
    path, lines = _file_lines(span_log, -1)
    last = json.loads(lines[-1])
    cp = {"event": "audit.checkpoint", "head": target["hash"], "head_seq": target["seq"],
          "key": _vm.key_id(mem_key.public_key()), "reason": "manual",
          "sealed_at": last["time"], "kind": "checkpoint", "seq": last["seq"] + 1,
          "prev": last["hash"], "time": last["time"]}
    lines.append(_sign(mem_key, cp))
    rewrite(path, lines)
    # same file: the worker declines it; file before: the worker takes it and
    # the window's hole sends the whole verify to the record path
    assert (_spanned(span_log, mem_key)[-1] == -1) == (where == "same file")
    report = _both(span_log, mem_key, jobs=2)
    assert report.ok and report.unchecked_checkpoints == 0
    assert report.checkpoints == _both(span_log, mem_key).checkpoints
