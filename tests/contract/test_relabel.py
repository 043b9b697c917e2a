"""Quarantine without destroying: ``relabel`` on every backend (issue 15).

``badged recover --quarantine`` and start-up recovery move keys out of the
agent namespace instead of destroying them; the key must keep its private
half (same public key, still signs) under the new name only, and a relabel
must never clobber an existing key.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.errors import KeyExistsError, KeyNotFoundError
from badged.identity.registry import Relabeling
from badged.keystore.port import KeyStore


def test_relabel_keeps_the_key_under_the_new_name_only(keystore: KeyStore,
                                                       key_prefix: str) -> None:
    assert isinstance(keystore, Relabeling)
    old, new = f"{key_prefix}/agent/v1/tok", f"{key_prefix}/quarantine/agent/v1/tok"
    public = keystore.generate(old).public_key()
    keystore.relabel(old, new)
    with pytest.raises(KeyNotFoundError):
        keystore.get(old)
    assert old not in keystore.list() and new in keystore.list()
    moved = keystore.get(new)
    assert moved.public_key().public_numbers() == public.public_numbers()
    public.verify(moved.sign(b"x", ec.ECDSA(hashes.SHA256())), b"x", ec.ECDSA(hashes.SHA256()))
    # The old name is free again, and the new key does not pair with the moved one.
    fresh = keystore.generate(old)
    assert fresh.public_key().public_numbers() != public.public_numbers()
    assert keystore.get(new).public_key().public_numbers() == public.public_numbers()
    keystore.destroy(old)
    assert keystore.get(new).public_key().public_numbers() == public.public_numbers()
    keystore.destroy(new)


def test_relabel_refuses_to_clobber_and_unknown_names(keystore: KeyStore,
                                                      key_prefix: str) -> None:
    assert isinstance(keystore, Relabeling)
    a, b = f"{key_prefix}/a", f"{key_prefix}/b"
    pub_a = keystore.generate(a).public_key()
    pub_b = keystore.generate(b).public_key()
    with pytest.raises(KeyExistsError):
        keystore.relabel(a, b)
    assert keystore.get(a).public_key().public_numbers() == pub_a.public_numbers()
    assert keystore.get(b).public_key().public_numbers() == pub_b.public_numbers()
    with pytest.raises(KeyNotFoundError):
        keystore.relabel(f"{key_prefix}/missing", f"{key_prefix}/c")
    keystore.destroy(a)
    keystore.destroy(b)
