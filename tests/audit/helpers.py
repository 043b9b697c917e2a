"""Shared helpers for the audit tests: a fake clock and log builders."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from badged.audit import AuditConfig, AuditLog
from badged.audit.files import list_files
from badged.audit.record import seal
from badged.keystore.port import KeyHandle

T0 = 1_790_000_000.0


class FakeClock:
    """Deterministic wall clock: advances only when told to (or by ``tick``)."""

    def __init__(self, now: float = T0, tick: float = 0.001) -> None:
        self.now = now
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


_SHARED_CLOCK = FakeClock()


def open_log(directory: Path, *, signer: KeyHandle | None = None, clock: Any = None,
             write: Any = os.write, fsync: Any = os.fsync, **cfg: Any) -> AuditLog:
    """Open a log with checkpoint triggers off unless asked (tests place them)."""
    cfg.setdefault("checkpoint_records", None)
    cfg.setdefault("checkpoint_seconds", None)
    return AuditLog.open(AuditConfig(directory=directory, **cfg), signer=signer,
                         clock=clock or _SHARED_CLOCK, write=write, fsync=fsync)


@contextlib.contextmanager
def tmpfs(where: Path, *, size: str = "1m", readonly: bool = False) -> Iterator[Path]:
    """Mount a real tmpfs (needs CAP_SYS_ADMIN); skips the test if we cannot."""
    import pytest

    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0700" + (",ro" if readonly else "")
    if shutil.which("mount") is None:
        pytest.skip("mount(8) not available")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def build_log(directory: Path, signer: KeyHandle | None, n: int = 30, every: int = 10,
              **cfg: Any) -> None:
    """n events, a signed checkpoint after every ``every`` events, closed (sealed)."""
    log = open_log(directory, signer=signer, **cfg)
    for i in range(1, n + 1):
        log.append_sync({"event": "token.issued", "agent": f"agent-{i % 3}", "jti": f"j{i}"})
        if signer is not None and i % every == 0:
            log.checkpoint_sync()
    log.close()


def log_lines(directory: Path) -> list[tuple[Path, list[bytes]]]:
    return [(p, p.read_bytes().splitlines(keepends=True)) for p in list_files(directory)]


def all_records(directory: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _p, lines in log_lines(directory):
        out.extend(json.loads(line) for line in lines)
    return out


def find_line(directory: Path, seq: int) -> tuple[Path, int]:
    """(file, 0-based line index) of the record with ``seq``."""
    for path, lines in log_lines(directory):
        for i, line in enumerate(lines):
            if json.loads(line)["seq"] == seq:
                return path, i
    raise KeyError(seq)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def reseal(rec: dict[str, Any]) -> bytes:
    """What an attacker without the device key can do: recompute a record's hash."""
    rec = dict(rec)
    rec.pop("hash", None)
    _digest, line = seal(rec)
    return line


def rechain(directory: Path, *, fix_checkpoint_heads: bool = False) -> None:
    """Re-link and re-hash every record, as an attacker without the device key can.

    With ``fix_checkpoint_heads`` the attacker also points each checkpoint's
    ``head`` at the rewritten chain -- the signature then no longer matches.
    """
    prev = "0" * 64
    hashes: dict[int, str] = {}
    for path, lines in log_lines(directory):
        out = []
        for line in lines:
            rec = json.loads(line)
            rec["prev"] = prev
            if fix_checkpoint_heads and rec.get("kind") == "checkpoint":
                rec["head"] = hashes.get(rec["head_seq"], rec["head"])
            out.append(reseal(rec))
            prev = json.loads(out[-1])["hash"]
            hashes[rec["seq"]] = prev
        rewrite(path, out)
