"""Key-store contract, written only against the port (badged.keystore.port)."""

from __future__ import annotations

import threading

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.errors import InvalidRequestError, KeyExistsError, KeyNotFoundError
from badged.keystore.port import KeyStore

ES256 = ec.ECDSA(hashes.SHA256())


def test_generate_sign_verify(keystore: KeyStore, key_prefix: str) -> None:
    key = keystore.generate(f"{key_prefix}/a")
    sig = key.sign(b"payload", ES256)
    key.public_key().verify(sig, b"payload", ES256)
    with pytest.raises(InvalidSignature):
        key.public_key().verify(sig, b"other payload", ES256)
    assert isinstance(key.public_key().curve, ec.SECP256R1)


def test_get_returns_same_public_key(keystore: KeyStore, key_prefix: str) -> None:
    key = keystore.generate(f"{key_prefix}/a")
    again = keystore.get(f"{key_prefix}/a")
    assert again.public_key().public_numbers() == key.public_key().public_numbers()


def test_duplicate_generate_raises_key_exists(keystore: KeyStore, key_prefix: str) -> None:
    keystore.generate(f"{key_prefix}/dup")
    with pytest.raises(KeyExistsError):
        keystore.generate(f"{key_prefix}/dup")


def test_unknown_key_raises_not_found(keystore: KeyStore, key_prefix: str) -> None:
    with pytest.raises(KeyNotFoundError):
        keystore.get(f"{key_prefix}/nope")
    with pytest.raises(KeyNotFoundError):
        keystore.destroy(f"{key_prefix}/nope")


def test_destroy_removes_key(keystore: KeyStore, key_prefix: str) -> None:
    name = f"{key_prefix}/gone"
    keystore.generate(name)
    assert name in keystore.list()
    keystore.destroy(name)
    assert name not in keystore.list()
    with pytest.raises(KeyNotFoundError):
        keystore.get(name)


def test_handle_of_destroyed_key_cannot_sign(keystore: KeyStore, key_prefix: str) -> None:
    name = f"{key_prefix}/revoked"
    handle = keystore.generate(name)
    keystore.destroy(name)
    with pytest.raises(KeyNotFoundError):
        handle.sign(b"x", ES256)


@pytest.mark.parametrize("bad", ["", "a b", "x;y", "k?q", "a" * 97, "é"])
def test_bad_names_rejected(keystore: KeyStore, bad: str) -> None:
    with pytest.raises(InvalidRequestError):
        keystore.generate(bad)


def test_concurrent_signing_from_many_threads(keystore: KeyStore, key_prefix: str) -> None:
    """SoftHSM without OS locking crashes here unless the adapter serializes."""
    keys = [keystore.generate(f"{key_prefix}/c{i}") for i in range(4)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(150):
                key = keys[(i + j) % len(keys)]
                msg = f"{i}-{j}".encode()
                key.public_key().verify(key.sign(msg, ES256), msg, ES256)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert all(not t.is_alive() for t in threads)


def test_ping_succeeds_on_live_store(keystore: KeyStore) -> None:
    keystore.ping()


def test_prehashed_and_bad_hashes(keystore: KeyStore, key_prefix: str) -> None:
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    from badged.errors import KeyStoreError

    key = keystore.generate(f"{key_prefix}/ph")
    digest = hashlib.sha256(b"msg").digest()
    prehashed = ec.ECDSA(Prehashed(hashes.SHA256()))
    key.public_key().verify(key.sign(digest, prehashed), b"msg", ES256)
    with pytest.raises(KeyStoreError):
        key.sign(digest[:20], prehashed)
    with pytest.raises(KeyStoreError):
        key.sign(b"msg", ec.ECDSA(hashes.SHA1()))
