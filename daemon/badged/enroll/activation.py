"""Credential activation: the challenge-response that ties an AK to an EK.

A TPM2_Certify by an attestation key (AK) proves only "some restricted key
signed this". What makes the AK *this TPM's* is TPM2_ActivateCredential: the
CA wraps a fresh secret to the EK public key of the (verified) EK
certificate, naming the AK; only the TPM that holds that EK's private key
*and* has an object with that exact Name loaded can unwrap it. A forger with
a copied EK certificate has no EK private key; a second TPM with the first's
EK certificate has the wrong EK; a software "AK" is not in any TPM. So the CA
trusts an AK Name only after the secret came back, and only for the request
it challenged.

The exchange works on files an operator carries (offline) or over the
enrollment RPC (online), with the same documents::

    request  (badgectl enroll -o req.json)              device -> CA
    challenge(badgectl ca challenge req.json)           CA -> device
    response (badgectl enroll activate chal.json)       device -> CA
    chain    (badgectl ca sign req.json --response ...) CA -> device

Binding: every document names ``request_sha256`` = SHA-256 of the request's
CSR (DER), which covers the device key, its SPIFFE ID and the evidence. The
CA keeps, per challenged request, only the AK Name and SHA-256 of the secret
(no secret at rest), so a response made for one request cannot complete
another, and a record is used once.

Pure apart from :class:`PendingActivations` (the CA's small on-disk index).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from badged.core import tpm_evidence
from badged.errors import AttestationError, InvalidRequestError
from badged.fsutil import atomic_write, ensure_private_dir

_logger = logging.getLogger(__name__)

CHALLENGE_FORMAT = "badged-enrollment-challenge/v1"
RESPONSE_FORMAT = "badged-enrollment-response/v1"
CHALLENGE_TTL = 24 * 3600
"""An operator may carry the challenge to the device and back within a day."""
MAX_DOCUMENT = 16 * 1024
SECRET_BYTES = 32
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ActivationRejected(InvalidRequestError):
    """A challenge or response that cannot complete activation; ``reason`` is stable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}", public=f"activation refused: {reason}: {detail}")
        self.reason = reason


@runtime_checkable
class CredentialActivator(Protocol):
    """A key store that can run TPM2_ActivateCredential with its AK and EK."""

    def ak_public(self) -> bytes:
        """Marshaled TPMT_PUBLIC of the AK."""
        ...

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """The secret, if the blob was made for this TPM's EK and AK Name."""
        ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, reason: str) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_DOCUMENT:
        raise ActivationRejected(reason, f"{what} must be base64")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ActivationRejected(reason, f"{what} must be base64") from None


def _load(data: bytes, fmt: str, reason: str) -> dict[str, Any]:
    if len(data) > MAX_DOCUMENT:
        raise ActivationRejected(reason, "document too large")
    try:
        doc = json.loads(data)
    except ValueError:
        raise ActivationRejected(reason, "not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ActivationRejected(reason, f"not a {fmt} document")
    digest = doc.get("request_sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise ActivationRejected(reason, "request_sha256 must be 64 lowercase hex digits")
    return doc


def request_digest(csr: x509.CertificateSigningRequest) -> str:
    """What every activation document is bound to: SHA-256 of the CSR (DER).

    The CSR, not the JSON wrapper, so re-indenting the file changes nothing
    while any change to the key, identity or evidence does.
    """
    return hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- CA side --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """What the CA remembers about one challenge: never the secret itself."""

    request_sha256: str
    device_id: str
    ak_name: bytes
    secret_sha256: bytes
    expires_at: int

    def to_json(self) -> bytes:
        return json.dumps({"request_sha256": self.request_sha256, "device_id": self.device_id,
                           "ak_name": self.ak_name.hex(), "secret_sha256": self.secret_sha256.hex(),
                           "expires_at": self.expires_at}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Pending:
        raw = json.loads(data)
        return cls(request_sha256=str(raw["request_sha256"]), device_id=str(raw["device_id"]),
                   ak_name=bytes.fromhex(raw["ak_name"]),
                   secret_sha256=bytes.fromhex(raw["secret_sha256"]),
                   expires_at=int(raw["expires_at"]))


def ek_public_key(ek_certificate: bytes | None) -> rsa.RSAPublicKey:
    """The EK public key a challenge is wrapped to, from the (already chained) certificate."""
    if ek_certificate is None:
        raise ActivationRejected("no_ek_certificate", "the TPM evidence carries no EK certificate")
    try:
        key = x509.load_der_x509_certificate(ek_certificate).public_key()
    except ValueError:
        raise ActivationRejected("no_ek_certificate", "EK certificate is not DER") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 2048:
        raise ActivationRejected("ek_unsupported",
                                 "credential activation needs the TPM's RSA-2048 EK certificate")
    return key


def make_challenge(*, request_sha256: str, device_id: str, ak_public: bytes,
                   ek_certificate: bytes | None, now: float) -> tuple[dict[str, Any], Pending]:
    """TPM2_MakeCredential for the AK of a verified request; the challenge
    document for the device and the record the CA keeps."""
    ak_name = tpm_evidence.tpm_name(ak_public)
    ek = ek_public_key(ek_certificate)
    secret = os.urandom(SECRET_BYTES)
    try:
        cred = tpm_evidence.make_credential(ek, ak_name, secret)
    except AttestationError as exc:
        raise ActivationRejected("ek_unsupported", str(exc)) from None
    expires = int(now) + CHALLENGE_TTL
    doc = {"format": CHALLENGE_FORMAT, "request_sha256": request_sha256, "device_id": device_id,
           "ak_name": ak_name.hex(), "credential_blob": _b64(cred.credential_blob),
           "encrypted_secret": _b64(cred.encrypted_secret), "expires_at": expires}
    pending = Pending(request_sha256=request_sha256, device_id=device_id, ak_name=ak_name,
                      secret_sha256=hashlib.sha256(secret).digest(), expires_at=expires)
    return doc, pending


def check_response(response: bytes, *, request_sha256: str, pending: Pending | None,
                   now: float) -> bytes:
    """The AK Name the response activated for this request, or ActivationRejected.

    Reasons: ``malformed_response``, ``response_for_another_request`` (a
    response replayed from another enrollment), ``no_challenge`` (this CA
    never challenged the request, or the record was used), ``challenge_expired``,
    ``wrong_secret`` (the device could not activate: not the TPM of that EK).
    """
    doc = _load(response, RESPONSE_FORMAT, "malformed_response")
    if doc["request_sha256"] != request_sha256:
        raise ActivationRejected("response_for_another_request",
                                 "the response answers a challenge for a different request")
    if pending is None or pending.request_sha256 != request_sha256:
        raise ActivationRejected("no_challenge",
                                 "no open challenge for this request (run badgectl ca challenge)")
    if now > pending.expires_at:
        raise ActivationRejected("challenge_expired", "the challenge has expired; issue a new one")
    secret = _unb64(doc.get("secret"), "secret", "malformed_response")
    if not hmac.compare_digest(hashlib.sha256(secret).digest(), pending.secret_sha256):
        raise ActivationRejected("wrong_secret", "the device did not recover the challenge secret: "
                                                 "its AK is not in the TPM of that EK")
    return pending.ak_name


class PendingActivations:
    """The CA's open challenges, one small file per request under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def _path(self, request_sha256: str) -> Path:
        if not _HEX64.fullmatch(request_sha256):
            raise ActivationRejected("malformed_response", "bad request digest")
        return self._dir / f"{request_sha256}.json"

    def put(self, pending: Pending) -> None:
        ensure_private_dir(self._dir)
        atomic_write(self._path(pending.request_sha256), pending.to_json())

    def get(self, request_sha256: str) -> Pending | None:
        try:
            return Pending.from_json(self._path(request_sha256).read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            _logger.warning("unreadable activation record", extra={"request": request_sha256})
            return None

    def consume(self, request_sha256: str) -> None:
        """Single use: the certificate is issued once per activation."""
        try:
            self._path(request_sha256).unlink()
        except FileNotFoundError:
            pass


# -- device side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    request_sha256: str
    device_id: str
    ak_name: bytes
    credential_blob: bytes
    encrypted_secret: bytes
    expires_at: int


def parse_challenge(data: bytes) -> Challenge:
    doc = _load(data, CHALLENGE_FORMAT, "malformed_challenge")
    expires = doc.get("expires_at")
    device = doc.get("device_id")
    if type(expires) is not int or not isinstance(device, str):
        raise ActivationRejected("malformed_challenge", "expires_at and device_id are required")
    try:
        ak_name = bytes.fromhex(str(doc.get("ak_name")))
    except ValueError:
        raise ActivationRejected("malformed_challenge", "ak_name must be hex") from None
    return Challenge(request_sha256=doc["request_sha256"], device_id=device, ak_name=ak_name,
                     credential_blob=_unb64(doc.get("credential_blob"), "credential_blob",
                                            "malformed_challenge"),
                     encrypted_secret=_unb64(doc.get("encrypted_secret"), "encrypted_secret",
                                             "malformed_challenge"),
                     expires_at=expires)


def activate(challenge: Challenge, activator: CredentialActivator, *, device_id: str,
             now: float) -> dict[str, Any]:
    """Run ActivateCredential for a challenge meant for this device; the response.

    The checks before the TPM call only make the refusal readable: the TPM
    itself refuses a blob for another EK or another AK Name.
    """
    if challenge.device_id != device_id:
        raise ActivationRejected("wrong_device", "the challenge is for another device")
    if now > challenge.expires_at:
        raise ActivationRejected("challenge_expired", "the challenge has expired")
    if not hmac.compare_digest(challenge.ak_name, tpm_evidence.tpm_name(activator.ak_public())):
        raise ActivationRejected("wrong_ak", "the challenge names another attestation key")
    try:
        secret = activator.activate_credential(challenge.credential_blob,
                                               challenge.encrypted_secret)
    except AttestationError:
        raise ActivationRejected("tpm_refused", "the TPM cannot activate this challenge: it was "
                                                "made for another EK (another TPM)") from None
    return {"format": RESPONSE_FORMAT, "request_sha256": challenge.request_sha256,
            "device_id": device_id, "secret": _b64(secret)}
