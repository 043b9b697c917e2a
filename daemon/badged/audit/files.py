"""Where audit records live on disk: file names, listing, line reading.

Layout of an audit directory (mode 0700)::

    audit-00000000000000000001.jsonl    records 1..n        (mode 0600)
    audit-00000000000000000nnn.jsonl    next file after rotation, named by its first seq
    audit-...jsonl.cut-<offset>         bytes cut off by crash recovery (kept as evidence)
    .lock                               flock held by the one writing process

Names sort in chain order, so readers need no index. The names are only a
hint for ordering and skipping: the chain inside the records is what is
trusted, so renaming files cannot reorder history undetected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PREFIX: Final = "audit-"
SUFFIX: Final = ".jsonl"
_NAME_RE: Final = re.compile(r"^audit-(\d{20})\.jsonl$")
LOCK_NAME: Final = ".lock"
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600


def file_name(first_seq: int) -> str:
    """Name of the file whose first record has ``first_seq`` (zero-padded to sort)."""
    return f"{PREFIX}{first_seq:020d}{SUFFIX}"


def name_seq(path: Path) -> int | None:
    """The first seq encoded in a log file's name, or None for other files."""
    m = _NAME_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_files(directory: Path) -> list[Path]:
    """Log files in chain order (ignores cut-off evidence and temp files)."""
    found = [p for p in directory.iterdir() if name_seq(p) is not None]
    return sorted(found, key=lambda p: p.name)


def fsync_dir(directory: Path) -> None:
    """Make a create/rename in ``directory`` durable (the entry, not only the data)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Line:
    """One line of a log file, with where it was found (for pinpointing)."""

    path: Path
    lineno: int  # 1-based
    offset: int  # byte offset of the line start
    data: bytes  # including the trailing b"\\n" unless ``complete`` is False

    @property
    def complete(self) -> bool:
        return self.data.endswith(b"\n")


def iter_lines(path: Path, *, start_offset: int = 0, start_lineno: int = 1) -> Iterator[Line]:
    """Yield every line of ``path``; the last may be incomplete (a torn write)."""
    with open(path, "rb") as fh:
        fh.seek(start_offset)
        offset, lineno = start_offset, start_lineno
        for data in fh:
            yield Line(path, lineno, offset, data)
            offset += len(data)
            lineno += 1


def read_last_line(path: Path, *, chunk: int = 65536) -> bytes | None:
    """The last complete (newline-terminated) line of ``path``, without reading it all."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos, buf = end, b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            last_nl = buf.rfind(b"\n")
            if last_nl < 0:
                continue
            start = buf.rfind(b"\n", 0, last_nl)
            if start >= 0 or pos == 0:
                return buf[start + 1 : last_nl + 1]
        return None
