"""Attacks on ``audit verify``'s sealed-record path (records checked on their bytes).

The fast path proves a record intact without parsing it when a signed
checkpoint of the same file seals it: the hash over the line less its
``"hash"`` member matches, ``prev`` links, and the chain reaches the signed
head, so the bytes *less that member* are what the daemon wrote. What the
hash does not cover is *where* the member sits. Each attack below keeps the
daemon's bytes and moves, duplicates or hides the member (or recomputes a
hash, as anyone can) in a sealed part of a file; the reference (record by
record) fails every one, so a fast path that let one through would make the
reports differ. ``_both`` compares whole reports; each test also checks
that the clean log was taken on bytes (``_scan_file(...).sealed``), so the
attacks are aimed at that path and not at a fallback.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from badged.audit import verify
from badged.audit.files import list_files
from badged.audit.record import seal
from badged.keystore.port import KeyHandle
from tests.audit.helpers import open_log, rewrite

_vm = sys.modules["badged.audit.verify"]


def _both(d: Path, key: KeyHandle | None, *, jobs: int = 1, **kw: Any) -> Any:
    pub = key.public_key() if key is not None else None
    ref = verify(d, pub, fast=False, **kw)
    fast = verify(d, pub, jobs=jobs, **kw)
    assert asdict(fast) == asdict(ref), (fast.summary(), ref.summary())
    return ref


def _sealed(d: Path, key: KeyHandle) -> list[int]:
    """Records each file's scan proved on bytes (None: the file took the record path)."""
    der = _vm._public_der(key.public_key())
    out = []
    for p in list_files(d):
        scan = _vm._scan_file(str(p), 200_000, der)
        out.append(-1 if scan is None else scan.sealed)
    return out


@pytest.fixture
def sealed_log(audit_dir: Path, mem_key: KeyHandle) -> Path:
    """~200 events shaped like the daemon's (a ``caller`` holding its process chain, a
    ``context`` object, before ``hash``), 3+ files, a checkpoint every 10."""
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=30_000)
    for i in range(1, 201):
        log.append_sync({"event": "token.issued", "agent": f"agent-{i % 3}",
                         "caller": {"exe": "/usr/bin/python3", "pid": 4000 + i, "uid": 1000,
                                    "chain": ["/usr/bin/bash", "/usr/lib/systemd/systemd"],
                                    "exe_path_verified": True, "unit": None},
                         "context": {"ticket": f"T-{i}", "dims": [{"k": "v"}]},
                         "jti": f"j{i}", "scopes": ["read", "write"]})
        if i % 10 == 0:
            log.checkpoint_sync()
    log.close()
    assert len(list_files(audit_dir)) >= 3
    return audit_dir


def _line(d: Path, file_index: int = 1, line_index: int = 5) -> tuple[Path, list[bytes], bytes]:
    """A record in the middle of a file, well before that file's last checkpoint head."""
    path = list_files(d)[file_index]
    lines = path.read_bytes().splitlines(keepends=True)
    line = lines[line_index]
    assert b'"kind":"event"' in line
    return path, lines, line


def _member(line: bytes) -> tuple[bytes, bytes]:
    """(the line less its hash member and newline, the member with its comma)."""
    digest = json.loads(line)["hash"]
    member = b',"hash":"' + digest.encode() + b'"'
    assert line.count(member) == 1
    return line.rstrip(b"\n").replace(member, b""), member


def test_a_clean_log_is_proved_on_bytes(sealed_log: Path, mem_key: KeyHandle) -> None:
    report = _both(sealed_log, mem_key, jobs=2)
    assert report.ok and report.records > 200
    sealed = _sealed(sealed_log, mem_key)
    assert all(n > 0 for n in sealed[:-1]), sealed  # every file but maybe the last
    assert sum(sealed) > 150
    # Without a key nothing can be sealed: the parsing fast path, same report.
    _both(sealed_log, None)
    _both(sealed_log, mem_key, window=5)


def _tamper(d: Path, make: Any) -> tuple[str, int]:
    path, lines, line = _line(d)
    body, member = _member(line)
    lines[5] = make(body, member) + b"\n"
    assert lines[5] != line
    rewrite(path, lines)
    return path.name, 6


def _insert_after(anchor: bytes, *, before: bool = False) -> Any:
    def make(body: bytes, member: bytes) -> bytes:
        at = body.index(anchor) + (0 if before else len(anchor))
        return body[:at] + member + body[at:]
    return make


@pytest.mark.parametrize(("make", "code"), [
    # after "jti" (which sorts after "hash"): a top-level member out of order
    (_insert_after(b',"kind"', before=True), "not_canonical"),
    # before "caller" (which sorts before "hash")
    (_insert_after(b',"caller"', before=True), "not_canonical"),
    # nested inside the "caller" object, between keys that sort around "hash"
    (_insert_after(b'"exe_path_verified":true'), "malformed"),
    # inside a string value
    (_insert_after(b'"agent":"age'), "malformed"),
    # inside the scopes array
    (_insert_after(b'"scopes":["read"'), "malformed"),
    # first in the object (no comma before it)
    (lambda body, member: b'{' + member[1:] + b',' + body[1:], "not_canonical"),
], ids=["after-jti", "before-caller", "nested", "in-string", "in-array", "first"])
def test_the_hash_member_moved_keeps_the_hash_but_fails(
        sealed_log: Path, mem_key: KeyHandle, make: Any, code: str) -> None:
    name, line = _tamper(sealed_log, make)
    report = _both(sealed_log, mem_key)
    assert not report.ok and report.first_bad is not None
    assert (report.first_bad.file, report.first_bad.line) == (name, line)
    if code != "malformed":
        assert report.first_bad.code == code
    else:
        assert report.first_bad.code in ("malformed", "not_canonical"), report.first_bad


def test_a_second_hash_member_nested_fails(sealed_log: Path, mem_key: KeyHandle) -> None:
    """Both members removed, the rest hashes to the stored hash: only counting catches it."""
    path, lines, line = _line(sealed_log)
    _body, member = _member(line)
    at = line.index(b'"exe":"/usr/bin/python3"') + len(b'"exe":"/usr/bin/python3"')
    lines[5] = line[:at] + member + line[at:]
    rewrite(path, lines)
    report = _both(sealed_log, mem_key)
    assert not report.ok and report.first_bad is not None
    assert (report.first_bad.file, report.first_bad.line) == (path.name, 6)


@pytest.mark.parametrize("junk", [b"\r", b"\x00", b" ", b"garbage", b"}"])
def test_junk_with_a_recomputed_hash_breaks_the_chain(
        sealed_log: Path, mem_key: KeyHandle, junk: bytes) -> None:
    """An attacker can recompute a line's own hash over anything; the next prev then breaks."""
    path, lines, line = _line(sealed_log)
    body, _ = _member(line)
    forged = body + junk
    digest = hashlib.sha256(forged).hexdigest()
    at = body.index(b',"jti"')
    lines[5] = forged[:at] + b',"hash":"' + digest.encode() + b'"' + forged[at:] + b"\n"
    rewrite(path, lines)
    report = _both(sealed_log, mem_key)
    assert not report.ok and report.first_bad is not None
    assert (report.first_bad.file, report.first_bad.line) == (path.name, 6)


def _append_tail(d: Path, make: Any) -> tuple[str, int]:
    """Add one record after the final checkpoint, linked and hashed as an attacker can."""
    path = list_files(d)[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    rec: dict[str, Any] = {"event": "token.issued", "agent": "agent-1",
                           "caller": {"exe": "/usr/bin/python3", "pid": 1, "uid": 1000},
                           "jti": "forged", "kind": "event", "prev": last["hash"],
                           "seq": last["seq"] + 1, "scopes": ["read"], "time": last["time"]}
    lines.append(make(rec))
    rewrite(path, lines)
    return path.name, len(lines)


def _hashed(body: bytes) -> bytes:
    """``body`` (a JSON object, as written) with a hash member over exactly these bytes."""
    digest = hashlib.sha256(body).hexdigest()
    at = body.index(b',"jti"')
    return body[:at] + b',"hash":"' + digest.encode() + b'"' + body[at:] + b"\n"


def _canonical(rec: dict[str, Any]) -> bytes:
    return seal(dict(rec))[1]


def _spaced(rec: dict[str, Any]) -> bytes:
    return _hashed(json.dumps(rec, sort_keys=True, separators=(",", ": ")).encode())


def _control(ch: bytes) -> Any:
    """A raw control character in a string (json would escape it: the bytes are edited)."""
    def make(rec: dict[str, Any]) -> bytes:
        body = json.dumps(dict(rec, agent="aXb"), sort_keys=True, separators=(",", ":")).encode()
        return _hashed(body.replace(b"aXb", b"a" + ch + b"b"))
    return make


@pytest.mark.parametrize(("make", "ok"), [
    (_canonical, True),
    (_spaced, False),
    (_control(b"\r"), False),
    (_control(b"\x00"), False),
    (lambda rec: _canonical(rec)[:-1] + b"trailing\n", False),
    (lambda rec: _hashed(json.dumps(rec, separators=(",", ":")).encode()), False),  # unsorted
], ids=["canonical", "spaces", "cr", "nul", "trailing", "unsorted"])
def test_the_unsealed_tail_is_checked_in_full(
        sealed_log: Path, mem_key: KeyHandle, make: Any, ok: bool) -> None:
    """No checkpoint seals the tail, so nothing there may pass on bytes alone."""
    name, line = _append_tail(sealed_log, make)
    report = _both(sealed_log, mem_key)
    assert report.ok is ok, report.summary()
    if ok:
        assert report.unsealed == 1
    else:
        assert report.first_bad is not None
        assert (report.first_bad.file, report.first_bad.line) == (name, line)


def test_unusual_but_valid_records_agree(audit_dir: Path, mem_key: KeyHandle) -> None:
    """Fields that defeat the byte tests (a "hash" value, nested prev/seq, deep nesting,
    escapes) only cost the fallback: the verdict is the reference's."""
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=6000)
    extras: list[dict[str, Any]] = [
        {"alg": "hash"}, {"hash_alg": "sha256"}, {"detail": {}},
        {"deep": {"a": {"b": [1, {"c": 2}]}}}, {"note": 'q"uote'}, {"x": 1.5},
        {"aa": {"hash": "cd" * 32}}, {}]
    for i in range(80):
        extra = dict(extras[i % len(extras)])
        if "detail" in extra:
            extra["detail"] = {"prev": "ab" * 32, "seq": i}
        log.append_sync({"event": "token.issued", "agent": "a", "jti": f"j{i}", **extra})
        if i % 9 == 8:
            log.checkpoint_sync()
    log.close()
    report = _both(audit_dir, mem_key)
    assert report.ok
    _both(audit_dir, mem_key, jobs=2)


def test_a_replayed_checkpoint_seals_only_what_it_sealed(
        sealed_log: Path, mem_key: KeyHandle) -> None:
    """A genuine checkpoint copied to the end (relinked, rehashed) vouches for its old head only."""
    path = list_files(sealed_log)[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    cps = [json.loads(x) for x in lines if b'"kind":"checkpoint"' in x]
    last = json.loads(lines[-1])
    forged = _append_forged(lines, last)
    replay = dict(cps[0])
    replay.pop("hash")
    replay.update(prev=forged["hash"], seq=forged["seq"] + 1)
    lines.append(seal(replay)[1])
    rewrite(path, lines)
    report = _both(sealed_log, mem_key)
    assert report.ok and report.unsealed >= 1  # the forged record stays unsealed


def _append_forged(lines: list[bytes], last: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {"event": "token.issued", "agent": "agent-1", "jti": "forged",
                           "kind": "event", "prev": last["hash"], "seq": last["seq"] + 1,
                           "time": last["time"]}
    rec["hash"], line = seal(rec)
    lines.append(line)
    return rec


def test_a_nested_prev_cannot_stand_in_for_the_link(audit_dir: Path, mem_key: KeyHandle) -> None:
    """A record may carry a "prev" of its own inside a field (here the hash of a forged
    record, as a logged request could). Found first by a byte search, it would link a
    forged predecessor; the one-per-line count sends the chunk to the parser instead."""
    log = open_log(audit_dir, signer=mem_key)
    for i in range(20):
        log.append_sync({"event": "token.issued", "agent": "a", "jti": f"j{i}"})
    [path] = list_files(audit_dir)
    before = json.loads(path.read_bytes().splitlines()[-1])
    forged: dict[str, Any] = {"event": "token.issued", "agent": "mallory", "jti": "forged",
                              "kind": "event", "prev": before["hash"], "seq": before["seq"] + 1,
                              "time": before["time"]}
    forged_hash, forged_line = seal(forged)
    log.append_sync({"event": "token.issued", "agent": "a", "jti": "real"})
    log.append_sync({"event": "token.issued", "agent": "a", "jti": "next",
                     "meta": {"prev": forged_hash, "via": "request"}})
    for i in range(20):
        log.append_sync({"event": "token.issued", "agent": "a", "jti": f"k{i}"})
    log.checkpoint_sync()
    log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    at = next(i for i, x in enumerate(lines) if b'"jti":"real"' in x)
    lines[at] = forged_line
    rewrite(path, lines)
    report = _both(audit_dir, mem_key)
    assert not report.ok and report.first_bad is not None
    assert (report.first_bad.line, report.first_bad.code) == (at + 2, "chain_broken")


@pytest.mark.parametrize("where", [b'"prev":"', b'"seq":', b'"agent":"'])
def test_bytes_that_are_not_ascii_do_not_break_the_fast_path(
        sealed_log: Path, mem_key: KeyHandle, where: bytes) -> None:
    """A file's first line starts a chunk: its prev and seq are read from bytes. A byte
    that is not ASCII there, under a hash recomputed to match, must not stop verify."""
    path = list_files(sealed_log)[1]
    lines = path.read_bytes().splitlines(keepends=True)
    body, _ = _member(lines[0])
    at = body.index(where) + len(where)
    body = body[:at] + b"\xff" + body[at + 1:]
    lines[0] = _hashed(body)
    rewrite(path, lines)
    report = _both(sealed_log, mem_key, jobs=1)
    assert not report.ok and report.first_bad is not None
    assert (report.first_bad.file, report.first_bad.line) == (path.name, 1)
