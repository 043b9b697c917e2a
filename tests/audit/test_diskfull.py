"""A really full filesystem (tmpfs of a few pages): issue nothing unaudited."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from badged.audit import verify
from badged.errors import AuditError
from badged.keystore.port import KeyHandle
from tests.audit.helpers import all_records, open_log, tmpfs


def test_full_tmpfs_fails_appends_and_recovers_when_space_returns(
        tmp_path: Path, mem_key: KeyHandle) -> None:
    with tmpfs(tmp_path / "small", size="64k") as mnt:
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * 40 * 1024)
        log = open_log(mnt / "audit", signer=mem_key)
        pad = "x" * 700
        acked: list[int] = []
        failed = 0

        async def hammer() -> int:
            nonlocal failed
            for i in range(200):
                results = await asyncio.gather(
                    *[log.append({"event": "token.issued", "jti": f"{i}-{k}", "pad": pad})
                      for k in range(4)], return_exceptions=True)
                for r in results:
                    if isinstance(r, AuditError):
                        failed += 1
                    else:
                        assert not isinstance(r, BaseException), r
                        acked.append(r.seq)
                if failed >= 8:
                    return i
            return -1

        assert asyncio.run(hammer()) >= 0, "the filesystem never filled up"
        assert acked, "nothing fit before the disk was full"
        with pytest.raises(AuditError):
            log.append_sync({"event": "still.full", "pad": pad * 8})
        # What was acknowledged is on disk, and the chain is intact.
        assert verify(mnt / "audit").ok
        on_disk = {r["seq"] for r in all_records(mnt / "audit")}
        assert set(acked) <= on_disk
        filler.unlink()
        r = log.append_sync({"event": "space.back"})
        log.close()
        report = verify(mnt / "audit", mem_key.public_key(), strict=True)
        assert report.ok, report.first_bad
        assert r.seq == max(acked) + 1


def test_file_size_limit_in_a_subprocess_refuses_appends_and_keeps_acked(
        audit_dir: Path) -> None:
    """EFBIG via RLIMIT_FSIZE: the unprivileged stand-in for a full disk."""
    import resource
    import signal
    import subprocess
    import sys

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))

    child = Path(__file__).with_name("fsize_child.py")
    proc = subprocess.run([sys.executable, str(child), str(audit_dir)], preexec_fn=limit,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[-2:] == ["refused", "3"]
    acked = [int(x) for x in lines[:-2]]
    assert acked == list(range(1, len(acked) + 1)) and len(acked) > 10
    # The half-written batch was cut back: exactly the acknowledged records.
    assert [r["seq"] for r in all_records(audit_dir)] == acked
    assert verify(audit_dir).ok
