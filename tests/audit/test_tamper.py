"""Hand-edited logs fail verification at the right record (file, line, seq)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from badged.audit import verify
from badged.audit.files import list_files
from badged.keystore.port import KeyHandle
from tests.audit.helpers import build_log, find_line, log_lines, rechain, reseal, rewrite

# 30 events, a checkpoint after every 10 -> seq 11, 22, 33 are checkpoints;
# one file, so line number == seq.


@pytest.fixture
def log30(audit_dir: Path, mem_key: KeyHandle) -> Path:
    build_log(audit_dir, mem_key, n=30, every=10)
    report = verify(audit_dir, mem_key.public_key(), strict=True)
    assert report.ok and report.records == 33
    return audit_dir


def _lines(d: Path) -> tuple[Path, list[bytes]]:
    [(path, lines)] = log_lines(d)
    return path, lines


def _bad(d: Path, key: KeyHandle | None = None, **kw: object) -> tuple[str, int, int | None, str]:
    report = verify(d, key.public_key() if key else None, **kw)  # type: ignore[arg-type]
    assert not report.ok and report.first_bad is not None, report.summary()
    b = report.first_bad
    return b.file, b.line, b.seq, b.code


def test_edited_record_is_pinpointed(log30: Path) -> None:
    path, lines = _lines(log30)
    lines[6] = lines[6].replace(b'"agent-1"', b'"agent-0"')
    rewrite(path, lines)
    assert _bad(log30) == (path.name, 7, 7, "hash_mismatch")


def test_edited_and_rehashed_record_breaks_the_next_link(log30: Path) -> None:
    path, lines = _lines(log30)
    rec = json.loads(lines[6])
    rec["decision"] = "allow"
    lines[6] = reseal(rec)
    rewrite(path, lines)
    assert _bad(log30) == (path.name, 8, 8, "chain_broken")


def test_rewritten_chain_is_caught_by_the_checkpoint_head(log30: Path) -> None:
    path, lines = _lines(log30)
    lines[14] = lines[14].replace(b"\"token.issued\"", b"\"token.denied\"")
    rewrite(path, lines)
    rechain(log30)  # consistent hashes, but checkpoint 22 signed the old head
    assert _bad(log30) == (path.name, 22, 22, "checkpoint_head_mismatch")


def test_deleted_record_is_pinpointed(log30: Path) -> None:
    path, lines = _lines(log30)
    del lines[11]  # seq 12
    rewrite(path, lines)
    assert _bad(log30) == (path.name, 12, 13, "seq_gap")


def test_deleted_first_record_is_reported(log30: Path) -> None:
    path, lines = _lines(log30)
    rewrite(path, lines[1:])
    name, line, seq, code = _bad(log30)
    assert (name, line, seq, code) == (path.name, 1, 2, "seq_gap")


def test_reordered_records_are_pinpointed(log30: Path) -> None:
    path, lines = _lines(log30)
    lines[14], lines[15] = lines[15], lines[14]
    rewrite(path, lines)
    assert _bad(log30) == (path.name, 15, 16, "seq_gap")


def test_duplicated_record_is_pinpointed(log30: Path) -> None:
    path, lines = _lines(log30)
    lines.insert(5, lines[4])
    rewrite(path, lines)
    assert _bad(log30) == (path.name, 6, 5, "seq_order")


def test_truncation_after_the_last_checkpoint_is_an_unsealed_tail(
        log30: Path, mem_key: KeyHandle) -> None:
    path, lines = _lines(log30)
    rewrite(path, lines[:27])  # drops 28..33, including the final checkpoint 33
    report = verify(log30, mem_key.public_key())
    assert report.ok and report.sealed_seq == 21 and report.unsealed == 5  # 23..27
    assert _bad(log30, mem_key, strict=True) == (path.name, 23, 23, "unsealed_tail")


def test_truncation_mid_record_is_a_torn_tail(log30: Path, mem_key: KeyHandle) -> None:
    path, lines = _lines(log30)
    rewrite(path, [*lines[:20], lines[20][:40]])
    report = verify(log30, mem_key.public_key())
    assert report.ok and report.torn_tail is not None and report.torn_tail.line == 21
    assert _bad(log30, mem_key, strict=True) == (path.name, 21, None, "torn")


def test_garbage_line_is_pinpointed(log30: Path) -> None:
    path, lines = _lines(log30)
    lines[9] = b"hello\n"
    rewrite(path, lines)
    assert _bad(log30) == (path.name, 10, None, "malformed")


def test_verify_from_a_later_seq(log30: Path, mem_key: KeyHandle) -> None:
    path, lines = _lines(log30)
    lines[2] = lines[2].replace(b"agent", b"AGENT")  # damage before the start
    rewrite(path, lines)
    report = verify(log30, mem_key.public_key(), from_seq=5)
    assert report.ok and report.first_seq == 5 and report.records == 29
    assert not verify(log30, mem_key.public_key(), from_seq=3).ok
    assert not verify(log30, from_seq=99).ok


@pytest.fixture
def rotated(audit_dir: Path, mem_key: KeyHandle) -> list[Path]:
    build_log(audit_dir, mem_key, n=40, every=10, rotate_bytes=1500)
    paths = list_files(audit_dir)
    assert len(paths) >= 4 and verify(audit_dir, mem_key.public_key(), strict=True).ok
    return paths


def test_deleted_middle_file_is_pinpointed(audit_dir: Path, rotated: list[Path]) -> None:
    rotated[1].unlink()
    first_of_next = json.loads(rotated[2].read_bytes().splitlines()[0])["seq"]
    assert _bad(audit_dir) == (rotated[2].name, 1, first_of_next, "seq_gap")


def test_swapped_files_are_detected(audit_dir: Path, rotated: list[Path]) -> None:
    a, b = rotated[1], rotated[2]
    tmp = a.with_name("x")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    _name, line, _seq, code = _bad(audit_dir)
    assert (line, code) == (1, "seq_gap")


def test_edit_in_an_older_file_is_pinpointed(audit_dir: Path, rotated: list[Path]) -> None:
    seq = json.loads(rotated[1].read_bytes().splitlines()[2])["seq"]
    path, idx = find_line(audit_dir, seq)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[idx] = lines[idx].replace(b'"token.issued"', b'"token.denied"')
    rewrite(path, lines)
    assert _bad(audit_dir) == (rotated[1].name, 3, seq, "hash_mismatch")


def test_torn_line_inside_the_log_is_a_failure(audit_dir: Path, rotated: list[Path]) -> None:
    lines = rotated[0].read_bytes().splitlines(keepends=True)
    rewrite(rotated[0], [*lines[:-1], lines[-1][:-1]])  # drop one newline in an old file
    name, line, _seq, code = _bad(audit_dir)
    assert (name, line, code) == (rotated[0].name, len(lines), "torn")


def test_checkpoint_beyond_the_verify_window_is_unchecked_not_trusted(
        log30: Path, mem_key: KeyHandle) -> None:
    report = verify(log30, mem_key.public_key(), window=0)  # remembers no heads
    assert report.ok and report.unchecked_checkpoints == 3 and report.sealed_seq == 0
    assert not verify(log30, mem_key.public_key(), window=0, strict=True).ok
