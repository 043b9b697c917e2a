"""The sealed secret store (badged.proxy.secretstore): sealing binds name and version,
a change is durable then audited then visible, and an unaudited change never is."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from badged.errors import (
    AlreadyExistsError,
    AuditError,
    ConfigError,
    InvalidRequestError,
    KeyStoreError,
    NotFoundError,
)
from badged.keystore.memory import MemoryKeyStore
from badged.proxy.secretstore import SecretStore


async def _run(fn: Callable[[], bytes]) -> bytes:
    return fn()


def _store(tmp_path: Path, ks: MemoryKeyStore | None = None) -> SecretStore:
    return SecretStore(tmp_path / "s.json", ks or MemoryKeyStore(), clock=lambda: 1000.0)


def test_set_rotate_delete_and_audit_order(tmp_path: Path) -> None:
    store = _store(tmp_path)
    records: list[Mapping[str, Any]] = []

    async def audit(rec: Mapping[str, Any]) -> None:
        # Durable before audited: the file already holds the change.
        assert rec["secret"]["name"] in json.loads((tmp_path / "s.json").read_text())[
            "secrets"] or rec["event"] == "secret.deleted"
        records.append(rec)

    async def go() -> None:
        await store.set("k", b"v1", rotate=False, caller={}, audit=audit, run=_run)
        with pytest.raises(AlreadyExistsError):
            await store.set("k", b"v2", rotate=False, caller={}, audit=audit, run=_run)
        await store.set("k", b"v2", rotate=True, caller={}, audit=audit, run=_run)
        assert store.reveal("k") == b"v2"
        with pytest.raises(InvalidRequestError):
            await store.set("j", b"a\r\nX-Injected: 1", rotate=False, caller={}, audit=audit,
                            run=_run)
        await store.delete("k", caller={}, audit=audit)
        with pytest.raises(NotFoundError):
            store.reveal("k")

    asyncio.run(go())
    assert [r["event"] for r in records] == ["secret.set", "secret.rotated", "secret.deleted"]
    assert all("v1" not in json.dumps(r) and "v2" not in json.dumps(r) for r in records)


def test_unaudited_change_never_takes_effect(tmp_path: Path) -> None:
    ks = MemoryKeyStore()
    store = _store(tmp_path, ks)

    async def ok(rec: Mapping[str, Any]) -> None:
        return None

    async def broken(rec: Mapping[str, Any]) -> None:
        raise AuditError("disk full")

    async def go() -> None:
        await store.set("k", b"old", rotate=False, caller={}, audit=ok, run=_run)
        with pytest.raises(AuditError):
            await store.set("k", b"new", rotate=True, caller={}, audit=broken, run=_run)

    asyncio.run(go())
    assert store.reveal("k") == b"old"
    assert _store(tmp_path, ks).reveal("k") == b"old"  # and on disk


def test_blob_moved_to_another_name_does_not_open(tmp_path: Path) -> None:
    ks = MemoryKeyStore()
    store = _store(tmp_path, ks)

    async def ok(rec: Mapping[str, Any]) -> None:
        return None

    async def go() -> None:
        await store.set("a", b"secret-a", rotate=False, caller={}, audit=ok, run=_run)
        await store.set("b", b"secret-b", rotate=False, caller={}, audit=ok, run=_run)

    asyncio.run(go())
    doc = json.loads((tmp_path / "s.json").read_text())
    doc["secrets"]["b"]["sealed"] = doc["secrets"]["a"]["sealed"]
    (tmp_path / "s.json").write_text(json.dumps(doc))
    with pytest.raises(KeyStoreError):
        _store(tmp_path, ks).reveal("b")


def test_corrupt_file_refuses_to_load(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(ConfigError):
        _store(tmp_path)
