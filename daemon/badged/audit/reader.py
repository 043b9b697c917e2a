"""Reading the log for people and SIEMs: tail, follow, export.

Usage::

    for rec in tail(audit_dir, 20, agent="deploy-bot"):
        print(rec["seq"], rec["event"])
    export(audit_dir, sys.stdout.buffer, from_seq=1000)      # JSON Lines
    for rec in follow(audit_dir, after_seq=last, stop=event):  # like tail -f
        ...

These never judge integrity -- that is :func:`badged.audit.verify.verify`'s
job -- but they only ever return complete lines that parse as JSON objects, so
a half-written line at the end of a live log is never shown or exported.
Export writes the stored bytes unchanged, so a SIEM can re-check the hashes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from badged.audit import files
from badged.audit.record import matches
from badged.errors import ConfigError

_logger = logging.getLogger(__name__)


def _dir(directory: Path | str) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError("audit directory not found", path=str(path))
    return path


def _files_from(path: Path, from_seq: int | None) -> list[Path]:
    """Log files that can hold records with seq >= ``from_seq``."""
    paths = files.list_files(path)
    if from_seq is None:
        return paths
    start = 0
    for i, p in enumerate(paths):
        first = files.name_seq(p)
        if first is not None and first <= from_seq:
            start = i
    return paths[start:]


def _parse(line: files.Line) -> dict[str, Any] | None:
    if not line.complete:
        return None
    try:
        obj = json.loads(line.data)
    except ValueError:
        _logger.warning("%s:%d: not a JSON record, skipped", line.path.name, line.lineno)
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("seq"), int):
        return None
    return obj


def iter_lines(directory: Path | str, *, from_seq: int | None = None, agent: str | None = None,
               events: list[str] | None = None) -> Iterator[tuple[files.Line, dict[str, Any]]]:
    """Every complete record with its raw line, in chain order, filtered."""
    for path in _files_from(_dir(directory), from_seq):
        for line in files.iter_lines(path):
            rec = _parse(line)
            if rec is None:
                continue
            if from_seq is not None and rec["seq"] < from_seq:
                continue
            if matches(rec, agent=agent, events=events):
                yield line, rec


def iter_records(directory: Path | str, *, from_seq: int | None = None,
                 agent: str | None = None, events: list[str] | None = None
                 ) -> Iterator[dict[str, Any]]:
    """Every complete record as a dict, in chain order, filtered."""
    for _line, rec in iter_lines(directory, from_seq=from_seq, agent=agent, events=events):
        yield rec


def tail(directory: Path | str, n: int = 20, *, agent: str | None = None,
         events: list[str] | None = None) -> list[dict[str, Any]]:
    """The last ``n`` matching records, oldest first.

    Reads files newest-first and stops once it has ``n``, so it stays cheap
    on a long history.
    """
    path = _dir(directory)
    found: deque[dict[str, Any]] = deque()
    for p in reversed(files.list_files(path)):
        batch: deque[dict[str, Any]] = deque(maxlen=n)
        for line in files.iter_lines(p):
            rec = _parse(line)
            if rec is not None and matches(rec, agent=agent, events=events):
                batch.append(rec)
        found.extendleft(reversed(batch))
        if len(found) >= n:
            break
    return list(found)[-n:] if n > 0 else []


def find_marked(directory: Path | str, marker: str, *, last_files: int = 2
                ) -> list[dict[str, Any]]:
    """Records of the newest ``last_files`` files whose line contains ``marker``.

    For start-up recovery: a registry change id is looked up only after a
    crash, and only near the end of the log (the change was the last thing
    in flight), so a byte search before parsing keeps it cheap on a long log.
    """
    needle = marker.encode()
    found: list[dict[str, Any]] = []
    for p in files.list_files(_dir(directory))[-last_files:]:
        for line in files.iter_lines(p):
            if needle in line.data:
                rec = _parse(line)
                if rec is not None:
                    found.append(rec)
    return found


def export(directory: Path | str, out: BinaryIO, *, from_seq: int | None = None,
           agent: str | None = None, events: list[str] | None = None) -> int:
    """Write matching records as JSON Lines (stored bytes); return how many."""
    count = 0
    for line, _rec in iter_lines(directory, from_seq=from_seq, agent=agent, events=events):
        out.write(line.data)
        count += 1
    return count


def follow(directory: Path | str, *, after_seq: int = 0, agent: str | None = None,
           events: list[str] | None = None, poll_interval: float = 0.5,
           stop: threading.Event | None = None) -> Iterator[dict[str, Any]]:
    """Yield records with seq > ``after_seq`` as they are appended, until ``stop``.

    Polls (no inotify dependency). Follows rotation to newer files, waits for
    a partial last line to be completed, and de-duplicates by seq, so a file
    replaced by crash recovery is simply re-read.
    """
    path = _dir(directory)
    stop = stop or threading.Event()
    last = after_seq
    current: Path | None = None
    offset = 0
    pending = b""
    while not stop.is_set():
        paths = _files_from(path, last + 1)
        if current is None and paths:
            current, offset, pending = paths[0], 0, b""
        progressed = False
        if current is not None:
            try:
                with open(current, "rb") as fh:
                    size = fh.seek(0, 2)
                    if size < offset:  # replaced (recovery) or truncated: re-read it
                        offset, pending = 0, b""
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                data, current = b"", None
            if data:
                progressed = True
                offset += len(data)
                chunk = pending + data
                *complete, pending = chunk.split(b"\n")
                for raw in complete:
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
                        continue
                    if rec["seq"] <= last:
                        continue
                    last = rec["seq"]
                    if matches(rec, agent=agent, events=events):
                        yield rec
            newer = [p for p in paths if current is not None and p.name > current.name]
            if not data and newer and not pending:
                current, offset = newer[0], 0
                progressed = True
        if not progressed:
            stop.wait(poll_interval)
