"""``badgectl audit trace``: one pass over the log, bounded memory (issue 21)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from badgeclient._cli import audit as audit_cli
from badged.audit import files


def _write(directory: Path, records: list[dict[str, Any]], per_file: int) -> None:
    directory.mkdir()
    for i in range(0, len(records), per_file):
        chunk = records[i:i + per_file]
        (directory / files.file_name(chunk[0]["seq"])).write_bytes(b"".join(
            json.dumps(r, separators=(",", ":"), sort_keys=True).encode() + b"\n"
            for r in chunk))


def _log(noise: int) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = [
        {"event": "grant.created", "agent": "bot", "grant": "g-1"},
        {"event": "delegation.created", "agent": "bot", "delegation": "d-9"},  # unrelated
    ]
    recs += [{"event": "token.issued", "agent": "other", "txn": f"t{i:06d}",
              "jti": f"j{i:06d}", "status_idx": i} for i in range(noise)]
    recs += [
        {"event": "approval.granted", "agent": "bot", "approval": "a-1", "txn": "TX"},
        {"event": "token.denied", "agent": "bot", "txn": "TX"},
        {"event": "token.issued", "agent": "bot", "txn": "TX", "jti": "JTI", "grant": "g-1",
         "approval": "a-1", "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"},
    ]
    recs += [{"event": "token.issued", "agent": "other", "txn": f"u{i:06d}"}
             for i in range(noise)]
    recs += [{"event": "approval.decided", "agent": "bot", "approval": "a-1"},
             {"event": "grant.revoked", "agent": "bot", "grant": "g-1"},
             {"event": "status.marked", "agent": "bot", "revoked": "grant", "grant": "g-1"},
             {"event": "status.marked", "agent": "bot", "revoked": "agent"}]
    for seq, r in enumerate(recs, 1):
        r["seq"] = seq
    return recs


@pytest.mark.parametrize("ident", ["TX", "JTI", "ab" * 16])
def test_trace_reads_each_file_once_and_finds_the_whole_chain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ident: str) -> None:
    _write(tmp_path / "audit", _log(3000), per_file=1000)
    opened: list[Path] = []
    real = audit_cli._blocks

    def counting(path: Path) -> Any:
        opened.append(path)
        return real(path)

    monkeypatch.setattr(audit_cli, "_blocks", counting)
    got = audit_cli.trace_records(tmp_path / "audit", ident)
    assert sorted(opened) == sorted(set(opened)) == files.list_files(tmp_path / "audit")
    events = [r["event"] for r in got]
    assert events == ["grant.created", "approval.granted", "token.denied", "token.issued",
                      "approval.decided", "grant.revoked", "status.marked", "status.marked"]
    assert audit_cli.trace_records(tmp_path / "audit", "nope") == []
    assert audit_cli.trace_records(tmp_path / "audit", "") == []


def test_trace_memory_is_bounded_and_says_what_it_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_cli, "TRACE_LINKED_MAX", 3)
    monkeypatch.setattr(audit_cli, "TRACE_BLOCK", 300)  # lines cross block reads
    recs = _log(10)
    # More lifecycle records than the bound before the credential.
    extra = [{"event": "grant.created", "agent": "x", "grant": f"g-x{i}"} for i in range(5)]
    recs = recs[:2] + extra + recs[2:]
    for seq, r in enumerate(recs, 1):
        r["seq"] = seq
    _write(tmp_path / "audit", recs, per_file=50)
    warned: list[str] = []
    got = audit_cli.trace_records(tmp_path / "audit", "TX", warn=warned.append)
    assert "token.issued" in [r["event"] for r in got]
    assert "grant.created" not in [r["event"] for r in got]  # dropped by the bound...
    assert warned and "not kept" in warned[0]  # ...and said so
