"""Retention: remove the oldest *sealed* audit files past a size or age limit.

Why: a caller that is refused still costs a record, so without a limit a
hostile local user can fill the disk with denials (issue 16). Deleting
history is itself a decision that must be audited and verifiable, so:

* only whole, closed files are removed, oldest first, never the file being
  written and never the newest ``keep_newest`` files;
* only files whose last record a signed checkpoint already covers (sealed):
  their content was vouched for by the device key before it went away;
* if ``export_dir`` is set the file is copied there (fsync'd) first, and a
  failed export stops retention instead of deleting;
* before the file is unlinked an ``audit.pruned`` record is made durable in
  the live log naming the file, its first and last seq, the last record's
  hash and the checkpoint that sealed it. ``verify`` then anchors the chain
  of what remains on that hash instead of genesis; a missing prefix without
  such a record still fails (``seq_gap``).

Runs on a worker thread from a slow monotonic timer (``AuditLog``), never on
the request path. A crash between the record and the unlink leaves the file
in place, which verifies as usual.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from badged.audit import files
from badged.audit.record import KIND_CHECKPOINT, RecordError, parse_line

_logger = logging.getLogger(__name__)

PRUNED_EVENT: Final = "audit.pruned"
DEFAULT_KEEP_NEWEST: Final = 2


@dataclass(frozen=True)
class RetentionPolicy:
    """Limits; 0 means "no limit of this kind" (keep forever is the default)."""

    retain_bytes: int = 0
    retain_days: float = 0.0
    export_dir: Path | None = None
    keep_newest: int = DEFAULT_KEEP_NEWEST

    @property
    def enabled(self) -> bool:
        return self.retain_bytes > 0 or self.retain_days > 0


@dataclass(frozen=True)
class Segment:
    """What a closed file holds, read from its own first and last records."""

    path: Path
    size: int
    first_seq: int
    last_seq: int
    last_hash: str
    last_time: str


@dataclass(frozen=True)
class Pruned:
    """One removal, as it was recorded (for tests and logs)."""

    file: str
    first_seq: int
    last_seq: int
    record_seq: int
    exported_to: str | None


def _read_segment(path: Path) -> Segment | None:
    """First/last record of a closed file; None if it cannot be read cleanly."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            first_raw = fh.readline()
        last_raw = files.read_last_line(path)
        if not first_raw.endswith(b"\n") or last_raw is None:
            return None
        first, last = parse_line(first_raw), parse_line(last_raw)
    except (OSError, RecordError):
        return None
    return Segment(path, size, int(first["seq"]), int(last["seq"]), str(last["hash"]),
                   str(last["time"]))


def _records(paths: list[Path]) -> Iterator[dict[str, Any]]:
    for p in paths:
        for line in files.iter_lines(p):
            if not line.complete:
                return
            try:
                yield parse_line(line.data)
            except RecordError:
                return


def find_sealer(later: list[Path], last_seq: int, last_hash: str) -> Mapping[str, Any] | None:
    """The first checkpoint after ``last_seq`` whose signed head covers it.

    The head must be ``last_seq`` itself (then its hash must match) or later:
    a checkpoint over a later head covers this record through the chain.
    Reading stops at the first match (normally within the next file).
    """
    for rec in _records(later):
        if rec.get("kind") != KIND_CHECKPOINT:
            continue
        head_seq = rec.get("head_seq")
        if not isinstance(head_seq, int) or head_seq < last_seq:
            continue
        if head_seq == last_seq and rec.get("head") != last_hash:
            return None
        return rec
    return None


def _export(seg: Segment, export_dir: Path) -> Path:
    """Copy the file to ``export_dir`` durably (temp name, fsync, rename, fsync dir)."""
    export_dir.mkdir(mode=files.DIR_MODE, parents=True, exist_ok=True)
    dest = export_dir / seg.path.name
    tmp = export_dir / f".{seg.path.name}.export"
    with open(seg.path, "rb") as src, open(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, files.FILE_MODE),
            "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    if tmp.stat().st_size != seg.size:
        tmp.unlink()
        raise OSError(f"export of {seg.path.name} is incomplete")
    os.replace(tmp, dest)
    files.fsync_dir(export_dir)
    return dest


def prune(directory: Path, policy: RetentionPolicy, *, current: Path,
          append: Callable[[Mapping[str, Any]], Any], now: float) -> list[Pruned]:
    """Remove what the policy allows, oldest first; return what was removed.

    ``current`` is the file being written (never touched); ``append`` makes a
    record durable before it returns (``AuditLog.append_sync``); ``now`` is
    wall-clock seconds (record times are wall clock). Stops at the first file
    it may not remove, so what remains is always a contiguous suffix.
    """
    if not policy.enabled:
        return []
    paths = files.list_files(directory)
    closed = [p for p in paths if p != current]
    keep = max(policy.keep_newest, 1)
    candidates = closed[: max(len(paths) - keep, 0)]
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            pass
    cutoff = now - policy.retain_days * 86400 if policy.retain_days > 0 else None
    done: list[Pruned] = []
    for path in candidates:
        seg = _read_segment(path)
        if seg is None:
            _logger.warning("audit retention: %s cannot be read cleanly; stopping", path.name)
            break
        over_size = policy.retain_bytes > 0 and total > policy.retain_bytes
        too_old = cutoff is not None and _parse_time(seg.last_time) < cutoff
        if not (over_size or too_old):
            break
        sealer = find_sealer(paths[paths.index(path) + 1:], seg.last_seq, seg.last_hash)
        if sealer is None:
            _logger.info("audit retention: %s is not sealed by a checkpoint yet; keeping it",
                         path.name)
            break
        exported: Path | None = None
        if policy.export_dir is not None:
            try:
                exported = _export(seg, policy.export_dir)
            except OSError as exc:
                _logger.error("audit retention: export of %s to %s failed (%s); "
                              "nothing deleted", path.name, policy.export_dir, exc)
                break
        event: dict[str, Any] = {
            "event": PRUNED_EVENT,
            "file": path.name,
            "first_seq": seg.first_seq,
            "last_seq": seg.last_seq,
            "last_hash": seg.last_hash,
            "sealed_by": sealer.get("seq"),
            "sealed_by_hash": sealer.get("hash"),
            "bytes": seg.size,
            "reason": "retain_bytes" if over_size else "retain_days",
            "exported_to": str(exported) if exported is not None else None,
        }
        receipt = append(event)
        path.unlink()
        files.fsync_dir(directory)
        total -= seg.size
        record_seq = int(getattr(receipt, "seq", 0))
        done.append(Pruned(path.name, seg.first_seq, seg.last_seq, record_seq,
                           event["exported_to"]))
        _logger.info("audit retention: removed %s (seq %d..%d), recorded as seq %d",
                     path.name, seg.first_seq, seg.last_seq, record_seq)
    return done


def _parse_time(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")  # unreadable time: never "too old"
