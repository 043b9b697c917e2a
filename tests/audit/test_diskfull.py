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
