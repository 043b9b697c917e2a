"""SecretSealer on every backend that has it: memory (software), SoftHSM (AES-GCM in
the token), swtpm (a data key sealed in the TPM). What the proxy's static secrets
rely on: a blob opens only with its own additional data, under its own key."""

from __future__ import annotations

import pytest

from badged.errors import KeyNotFoundError, KeyStoreError
from badged.keystore.port import KeyStore, SecretSealer
from tests.contract.conftest import key_prefix, keystore

__all__ = ["key_prefix", "keystore"]


def test_seal_round_trip_and_binding(keystore: KeyStore, key_prefix: str) -> None:
    assert isinstance(keystore, SecretSealer)
    name = f"{key_prefix}/seal"
    blob = keystore.seal(name, b"sk-live-123", b"aad-1")
    assert b"sk-live-123" not in blob
    assert keystore.unseal(name, blob, b"aad-1") == b"sk-live-123"
    assert keystore.seal(name, b"sk-live-123", b"aad-1") != blob  # a fresh nonce each time
    with pytest.raises(KeyStoreError):
        keystore.unseal(name, blob, b"aad-2")  # another name or version
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(KeyStoreError):
        keystore.unseal(name, tampered, b"aad-1")
    with pytest.raises(KeyNotFoundError):
        keystore.unseal(f"{key_prefix}/other", blob, b"aad-1")
    # The sealing key is not an agent key: start-up reconcile must not see it.
    assert name not in keystore.list()
