"""Fixtures for the audit tests: a private directory, a fake clock, software keys.

Checkpoint tests that matter use the real SoftHSM token (``pkcs11_store``);
the in-memory key is for the many tests where the signature is incidental.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from badged.keystore.memory import MemoryKeyStore
from badged.keystore.port import KeyHandle
from tests.audit.helpers import FakeClock


@pytest.fixture
def audit_dir(tmp_path: Path) -> Path:
    return tmp_path / "audit"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mem_key() -> KeyHandle:
    return MemoryKeyStore().generate("device")


@pytest.fixture
def hsm_key(pkcs11_store: object) -> KeyHandle:
    """A device key really generated inside the SoftHSM token."""
    from badged.keystore.port import KeyStore

    assert isinstance(pkcs11_store, KeyStore)
    return pkcs11_store.generate(f"audit-{uuid.uuid4().hex[:12]}")
