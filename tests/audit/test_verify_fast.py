"""The fast ``audit verify`` (whole chunks, files in worker processes) finds what the slow one does.

The fast path may only *confirm* files; every finding must be exactly the
record-by-record path's (``fast=False``, the reference). Each test compares
the whole report of both on a log of many small files, with checkpoints
whose heads sit in the previous file, after tampering in the first, a middle
and the last file -- so a fast path that wrongly passed a file would make
the reports differ (and the log pass).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from badged.audit import verify
from badged.audit.files import list_files
from badged.keystore.port import KeyHandle
from tests.audit.helpers import build_log, log_lines, open_log, rechain, rewrite

verify_module = __import__("badged.audit.verify", fromlist=["_orjson_spelling_may_differ"])


def _both(d: Path, key: KeyHandle | None, *, jobs: int = 1, **kw: Any) -> Any:
    """Verify fast (``jobs`` processes) and record by record; the reports must be equal."""
    pub = key.public_key() if key is not None else None
    ref = verify(d, pub, fast=False, **kw)
    fast = verify(d, pub, jobs=jobs, **kw)
    assert asdict(fast) == asdict(ref), (fast.summary(), ref.summary())
    return ref


@pytest.fixture
def many(audit_dir: Path, mem_key: KeyHandle) -> Path:
    """~400 events in ~15 files; a checkpoint every 25 events (heads often one file back)."""
    build_log(audit_dir, mem_key, n=400, every=25, rotate_bytes=7000)
    assert len(list_files(audit_dir)) >= 10
    return audit_dir


def _edit(d: Path, file_index: int, line_index: int) -> tuple[str, int]:
    path = list_files(d)[file_index]
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line_index] = lines[line_index].replace(b'"token.issued"', b'"token.denied"')
    rewrite(path, lines)
    return path.name, line_index + 1


def test_clean_log_in_two_processes_matches_the_reference(many: Path, mem_key: KeyHandle) -> None:
    report = _both(many, mem_key, jobs=2)
    assert report.ok and report.records == 416 and report.checkpoints == 16
    assert report.unchecked_checkpoints == 0 and report.sealed_seq > 380
    _both(many, mem_key, window=10)  # some heads out of the window: counted the same
    _both(many, mem_key, strict=True, from_seq=150)
    _both(many, None)


@pytest.mark.parametrize("where", [0, 6, -1])
def test_an_edited_record_is_found_in_any_file(many: Path, mem_key: KeyHandle, where: int) -> None:
    name, line = _edit(many, where, 3)
    report = _both(many, mem_key, jobs=2 if where == 6 else 1)
    assert not report.ok and report.first_bad is not None
    assert (report.first_bad.file, report.first_bad.line, report.first_bad.code) == (
        name, line, "hash_mismatch")


def test_a_rewritten_chain_fails_at_the_checkpoint_in_a_later_file(
        many: Path, mem_key: KeyHandle) -> None:
    _edit(many, 4, 2)
    rechain(many)  # every hash and link consistent again; only the signed heads differ
    report = _both(many, mem_key, jobs=2)
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.code == "checkpoint_head_mismatch"


def test_a_record_deleted_at_a_file_boundary_is_a_gap(many: Path, mem_key: KeyHandle) -> None:
    path = list_files(many)[5]
    lines = path.read_bytes().splitlines(keepends=True)
    rewrite(path, lines[1:])
    report = _both(many, mem_key)
    assert report.first_bad is not None and report.first_bad.code == "seq_gap"


def test_files_swapped_and_a_torn_tail(many: Path, mem_key: KeyHandle) -> None:
    paths = list_files(many)
    last = paths[-1]
    last.write_bytes(last.read_bytes()[:-20])  # torn: a warning unless strict
    report = _both(many, mem_key)
    assert report.ok and report.torn_tail is not None
    assert not _both(many, mem_key, strict=True).ok
    a, b = paths[3].read_bytes(), paths[4].read_bytes()
    paths[3].write_bytes(b)
    paths[4].write_bytes(a)
    assert not _both(many, mem_key).ok


def test_floats_escapes_and_nested_hash_fields_take_the_right_path(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    log = open_log(audit_dir, signer=mem_key, rotate_bytes=4000)
    for i in range(60):
        log.append_sync({"event": "token.issued", "agent": "a", "jti": f"j{i}",
                         "detail": {"hash": "ab" * 32, "n": i}})
        if i % 7 == 0:
            log.append_sync({"event": "odd", "small": 1e-07, "big": 1e16, "mid": 0.5,
                             "note": "h\u00e9llo \"q\"\n", "e": "1e5,"})
        if i % 10 == 9:
            log.checkpoint_sync()
    log.close()
    report = _both(audit_dir, mem_key)
    assert report.ok and report.records > 60


def test_a_float_in_orjson_spelling_is_not_canonical(audit_dir: Path, mem_key: KeyHandle) -> None:
    """orjson writes 1e-07 as 1e-7: a record so spelled, hashed as spelled, is not canonical.

    The fast path parses and re-encodes with orjson, which would accept it
    (appended last, its link is right); it must notice the spelling and
    leave the verdict to the reference.
    """
    build_log(audit_dir, mem_key, n=30, every=10)
    [(path, lines)] = log_lines(audit_dir)
    last = json.loads(lines[-1])
    body = {"event": "odd", "small": 1e-07, "kind": "event", "prev": last["hash"],
            "seq": last["seq"] + 1, "time": last["time"]}
    spelled = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    assert b'"small":1e-7' in spelled  # json (the canonical form) writes 1e-07
    body["hash"] = hashlib.sha256(spelled).hexdigest()
    lines.append(orjson.dumps(body, option=orjson.OPT_SORT_KEYS) + b"\n")
    rewrite(path, lines)
    report = _both(audit_dir, mem_key)
    assert report.first_bad is not None and report.first_bad.line == len(lines)
    assert report.first_bad.code == "hash_mismatch"


def test_orjson_float_spellings_that_differ_are_always_noticed() -> None:
    """Every float whose orjson text differs from json's must trip the detector."""
    rng = random.Random(7)
    may_differ = verify_module._orjson_spelling_may_differ
    checked = 0
    for exp in range(-325, 309, 3):
        for _ in range(12):
            x = rng.choice([1.0, rng.random() * 10, float(rng.randint(1, 9)), rng.random()])
            try:
                v = x * 10.0 ** exp
            except OverflowError:
                continue
            for value in (v, -v):
                if value in (float("inf"), float("-inf")):
                    continue
                ours = orjson.dumps({"v": value, "w": [value]})
                canonical = json.dumps({"v": value, "w": [value]},
                                       separators=(",", ":")).encode()
                checked += 1
                if ours != canonical:
                    assert may_differ(ours + b"\n"), (ours, canonical)
    assert checked > 2000
    assert not may_differ(b'{"a":"true","b":true,"c":false,"d":"ab3e45","e":[1,2]}\n')
