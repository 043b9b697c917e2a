"""The ``keystore`` fixture: one contract suite, run over every backend.

Backends that need infrastructure are fetched lazily with
``request.getfixturevalue`` so a machine without swtpm only skips those params.
Each test gets a unique key-name prefix instead of a fresh token, because a
process can hold only one PKCS#11 login (FINDINGS §2).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from badged.keystore.memory import MemoryKeyStore
from badged.keystore.port import KeyStore


@pytest.fixture(params=[
    "memory",
    pytest.param("softhsm", marks=pytest.mark.softhsm),
    pytest.param("tpm", marks=pytest.mark.tpm),
])
def keystore(request: pytest.FixtureRequest) -> Iterator[KeyStore]:
    if request.param == "memory":
        store: KeyStore = MemoryKeyStore()
    elif request.param == "softhsm":
        store = request.getfixturevalue("pkcs11_store")
    elif request.param == "tpm":
        store = request.getfixturevalue("tpm_store")
    else:  # pragma: no cover
        raise AssertionError(request.param)
    yield store


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"
