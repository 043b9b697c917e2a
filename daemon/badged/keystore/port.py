"""The key-store port: the only view of keys the rest of the daemon has.

Credential code signs through :class:`KeyHandle`, whose ``sign`` mirrors
``cryptography``'s ``EllipticCurvePrivateKey.sign`` (DER signature, hash chosen
by the ``ECDSA`` algorithm object), so minting is the same for every backend.

Contract (checked for every backend by ``tests/contract``):

* ``generate`` of an existing name raises :class:`~badged.errors.KeyExistsError`;
* ``get``/``destroy`` of an unknown name raise :class:`~badged.errors.KeyNotFoundError`;
* a token/TPM that went away raises
  :class:`~badged.errors.KeyStoreUnavailableError` and the store recovers by
  itself once the hardware is back (no daemon restart);
* every method is safe to call from any thread: the adapter serializes access
  to its vendor library itself (SoftHSM and ESAPI both break when shared).

Key names are opaque to the store (``agent/deploy-bot/tok/1``); they must match
``[A-Za-z0-9._/:-]{1,96}``.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from badged.errors import KeyStoreError

_NAME_RE = re.compile(r"^[A-Za-z0-9._/:-]{1,96}$")
DEVICE_KEY = "badged/device/v1"
"""The daemon's own key (signs the audit log's checkpoints); here so start-up can
ask for it before the daemon's composition root is imported (issue 22)."""


class KeyAlgorithm(enum.Enum):
    """Key types the daemon creates. P-256 is the only default: TPMs and
    SoftHSM both do it well, unlike Ed25519 (see FINDINGS §2)."""

    EC_P256 = "ec-p256"


def check_key_name(name: str) -> str:
    """Reject names that could smuggle separators into labels or URIs."""
    if not _NAME_RE.match(name):
        from badged.errors import InvalidRequestError

        raise InvalidRequestError(f"invalid key name {name!r}")
    return name


_DIGEST_NAMES = {32: "sha256", 48: "sha384", 64: "sha512"}
_HASHERS: dict[str, Callable[[bytes], Any]] = {
    "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512,
}


def digest_for(data: bytes, signature_algorithm: ec.ECDSA, *, backend: str) -> tuple[str, bytes]:
    """(hash name, digest) to sign, for hardware that signs digests only.

    SoftHSM has no CKM_ECDSA_SHA256 and a TPM signs a digest, so every adapter
    hashes in software -- the same way, including ``Prehashed`` input.
    Runs on every signature: module-level imports and a direct constructor
    instead of ``hashlib.new(name)``.
    """
    algo = signature_algorithm.algorithm
    if isinstance(algo, Prehashed):
        name = _DIGEST_NAMES.get(algo.digest_size)
        if name is None or len(data) != algo.digest_size:
            raise KeyStoreError("prehashed digest has the wrong length", backend=backend)
        return name, data
    name = algo.name
    hasher = _HASHERS.get(name)
    if hasher is None:
        raise KeyStoreError(f"unsupported hash {name}", backend=backend)
    return name, hasher(data).digest()


@dataclass(frozen=True)
class KeyProperties:
    """What a backend can truthfully say about where a key lives.

    Read back from the hardware, not from what was requested at generation,
    so it can serve as (unsigned) evidence.
    """

    backend: str
    sensitive: bool
    extractable: bool
    never_extractable: bool
    local: bool
    extra: dict[str, str] = field(default_factory=dict)


class KeyHandle(Protocol):
    """A private key held by a backend; the private half never leaves it."""

    @property
    def name(self) -> str: ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        """Sign ``data`` (hashed with the algorithm's hash); DER-encoded ECDSA."""
        ...


class RawSigner(Protocol):
    """Optional extra of a :class:`KeyHandle` whose hardware returns r||s.

    ``sign_raw`` signs like ``sign`` but returns the IEEE P1363 form (r||s,
    32 bytes each for P-256), which is what JWS ES256 carries; callers that
    need it look the method up with ``getattr`` and fall back to DER.
    """

    def sign_raw(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes: ...


@runtime_checkable
class KeyStore(Protocol):
    """Required operations of every backend."""

    backend: str

    def generate(self, name: str, algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> KeyHandle: ...

    def get(self, name: str) -> KeyHandle: ...

    def list(self) -> Sequence[str]: ...

    def destroy(self, name: str) -> None: ...

    def properties(self, name: str) -> KeyProperties: ...

    def ping(self) -> None:
        """Raise KeyStoreUnavailableError if the hardware cannot be reached now."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class HealthReporter(Protocol):
    """Optional: a backend that can say why it cannot sign now.

    ``problem()`` must read state only -- no hardware command, no device
    lock -- so health answers while the hardware hangs
    (:mod:`badged.keystore.watchdog`).
    """

    def problem(self) -> str | None: ...


@runtime_checkable
class SecretSealer(Protocol):
    """Optional: seal small secrets under a symmetric key that never leaves the hardware.

    For values the daemon must keep at rest yet use in the clear -- the
    credential proxy's static API keys (badged.proxy.secretstore). ``seal``
    creates the key ``key_name`` in the token on first use (AES-256,
    sensitive, non-extractable) and returns nonce || AES-GCM ciphertext || tag;
    ``aad`` binds a blob to its context, so one secret's blob cannot be
    passed off as another's. ``unseal`` raises KeyStoreError on any mismatch.
    """

    def seal(self, key_name: str, plaintext: bytes, aad: bytes) -> bytes: ...

    def unseal(self, key_name: str, blob: bytes, aad: bytes) -> bytes: ...
