"""In-memory key store: for unit tests of our own logic only.

Deliberately *not* selectable from a config file (it is absent from
``BACKENDS``): a production daemon must never end up with software keys
because of a typo. Tests construct it directly.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from badged.errors import KeyExistsError, KeyNotFoundError
from badged.keystore.port import (
    KeyAlgorithm,
    KeyHandle,
    KeyProperties,
    check_key_name,
    digest_for,
)


class _MemoryKey:
    def __init__(self, name: str, key: ec.EllipticCurvePrivateKey) -> None:
        self._name = name
        self._key: ec.EllipticCurvePrivateKey | None = key
        self._public = key.public_key()

    @property
    def name(self) -> str:
        return self._name

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        key = self._key
        if key is None:  # destroyed, like a token object handle that went invalid
            raise KeyNotFoundError(f"key {self._name} was destroyed", backend="memory")
        # Same hashing rules as the hardware adapters, so the contract is uniform.
        name, digest = digest_for(data, signature_algorithm, backend="memory")
        algo = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[name]
        return key.sign(digest, ec.ECDSA(Prehashed(algo)))


class MemoryKeyStore:
    """Software keys in a dict. Unsafe for anything but tests."""

    backend = "memory"

    def __init__(self) -> None:
        self._keys: dict[str, _MemoryKey] = {}
        self._sealing: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def generate(self, name: str, algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> KeyHandle:
        check_key_name(name)
        with self._lock:
            if name in self._keys:
                raise KeyExistsError(f"key {name} exists", backend=self.backend)
            key = _MemoryKey(name, ec.generate_private_key(ec.SECP256R1()))
            self._keys[name] = key
            return key

    def get(self, name: str) -> KeyHandle:
        with self._lock:
            try:
                return self._keys[name]
            except KeyError:
                raise KeyNotFoundError(f"key {name} not found", backend=self.backend) from None

    def list(self) -> Sequence[str]:
        with self._lock:
            return sorted(self._keys)

    def destroy(self, name: str) -> None:
        with self._lock:
            key = self._keys.pop(name, None)
            if key is None:
                raise KeyNotFoundError(f"key {name} not found", backend=self.backend)
            key._key = None

    def relabel(self, name: str, new_name: str) -> None:
        """Rename a key in place (quarantine): it keeps its private half."""
        check_key_name(new_name)
        with self._lock:
            if new_name in self._keys:
                raise KeyExistsError(f"key {new_name} exists", backend=self.backend)
            key = self._keys.pop(name, None)
            if key is None:
                raise KeyNotFoundError(f"key {name} not found", backend=self.backend)
            key._name = new_name
            self._keys[new_name] = key

    def properties(self, name: str) -> KeyProperties:
        self.get(name)
        return KeyProperties(
            backend=self.backend, sensitive=False, extractable=True,
            never_extractable=False, local=True,
        )

    def ping(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self._keys.clear()

    # SecretSealer, in software: for unit tests of the secret store only.
    def seal(self, key_name: str, plaintext: bytes, aad: bytes) -> bytes:
        import os

        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        with self._lock:
            key = self._sealing.setdefault(check_key_name(key_name), AESGCM.generate_key(256))
        nonce = os.urandom(12)
        return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)

    def unseal(self, key_name: str, blob: bytes, aad: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from badged.errors import KeyStoreError

        key = self._sealing.get(key_name)
        if key is None:
            raise KeyNotFoundError(f"sealing key {key_name} not found", backend=self.backend)
        try:
            return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
        except (InvalidTag, ValueError):
            raise KeyStoreError("unseal failed", backend=self.backend) from None
