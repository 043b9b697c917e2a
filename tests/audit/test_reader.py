"""tail / follow / export helpers: complete lines only, filters, rotation."""

from __future__ import annotations

import io
import threading
from pathlib import Path

from badged.audit import export, follow, iter_records, tail
from badged.audit.files import list_files
from tests.audit.helpers import build_log, open_log


def test_tail_spans_rotated_files_and_filters(audit_dir: Path) -> None:
    build_log(audit_dir, None, n=60, rotate_bytes=1000)
    assert len(list_files(audit_dir)) > 3
    assert [r["seq"] for r in tail(audit_dir, 5)] == [56, 57, 58, 59, 60]
    got = tail(audit_dir, 30, agent="agent-2")
    assert len(got) == 20 and all(r["agent"] == "agent-2" for r in got)
    assert [r["seq"] for r in got] == sorted(r["seq"] for r in got)
    assert tail(audit_dir, 0) == []


def test_readers_skip_a_torn_last_line(audit_dir: Path) -> None:
    build_log(audit_dir, None, n=5)
    path = list_files(audit_dir)[-1]
    path.write_bytes(path.read_bytes() + b'{"seq":6,"agent":')
    assert [r["seq"] for r in iter_records(audit_dir)] == [1, 2, 3, 4, 5]
    out = io.BytesIO()
    assert export(audit_dir, out) == 5
    assert out.getvalue().count(b"\n") == 5


def test_export_from_seq_and_event_prefix(audit_dir: Path) -> None:
    log = open_log(audit_dir)
    for i in range(10):
        log.append_sync({"event": "token.issued" if i % 2 else "token.denied", "i": i})
    log.close()
    out = io.BytesIO()
    assert export(audit_dir, out, from_seq=4, events=["token.den"]) == 3  # seq 5, 7, 9


def test_follow_yields_new_records_across_rotation_until_stopped(audit_dir: Path) -> None:
    build_log(audit_dir, None, n=3)
    stop = threading.Event()
    seen: list[int] = []
    done = threading.Event()

    def reader() -> None:
        for rec in follow(audit_dir, after_seq=3, poll_interval=0.01, stop=stop):
            seen.append(rec["seq"])
            if len(seen) == 10:
                done.set()

    t = threading.Thread(target=reader)
    t.start()
    log = open_log(audit_dir, rotate_bytes=500)
    for i in range(10):
        log.append_sync({"event": "x", "i": i})
    log.close()
    done.wait(60)  # guard against a hang only
    stop.set()
    t.join(60)
    assert not t.is_alive()
    assert seen == list(range(4, 14))
