"""The device side of enrollment: build the request, check the issued chain.

Pure functions over the device key handle and values; the servicer does
the I/O (store) and the audit.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from badged.core import evidence
from badged.core.jose import ec_public_jwk, jwk_thumbprint
from badged.core.x509 import build_csr, same_public_key, to_pem
from badged.keystore.port import KeyHandle, KeyProperties

_logger = logging.getLogger(__name__)

REQUEST_FORMAT = "badged-enrollment-request/v1"
EVIDENCE_TTL = 7 * 86400


class ChainRejected(ValueError):
    """The chain offered for import cannot serve as this device's identity."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def device_id(device_key: KeyHandle) -> str:
    """Stable id of the device: the RFC 7638 thumbprint of its key."""
    return jwk_thumbprint(ec_public_jwk(device_key.public_key()))


def device_spiffe_id(trust_domain: str, dev_id: str) -> str:
    return f"spiffe://{trust_domain}/device/{dev_id}"


def enrollment_request(*, device_key: KeyHandle, props: KeyProperties, trust_domain: str,
                       now: float, nonce: str | None = None,
                       certify: evidence.Certifier | None = None,
                       agents: list[str] | None = None) -> dict[str, Any]:
    """The one file an operator carries to the CA.

    The CSR proves possession of the device key and names the device's
    SPIFFE ID; the evidence (the device key's attributes as read from the
    token, self-signed since nothing else can vouch for them yet) rides
    inside the CSR, so the CSR signature covers it. ``agents``: the agents
    the device hosts now, a suggestion the CA operator accepts explicitly
    (``--agents-from-request``) or replaces (``--agent``); it is not signed
    and the CA never takes it silently.
    """
    dev_id = device_id(device_key)
    spiffe = device_spiffe_id(trust_domain, dev_id)
    ev_claims = evidence.build_evidence_claims(
        issuer=spiffe, subject=spiffe, attested=device_key.public_key(), props=props, now=now,
        ttl_seconds=EVIDENCE_TTL, nonce=nonce, certify=certify)
    ev = evidence.sign_evidence(ev_claims, device_key=device_key)
    csr = build_csr(device_key, common_name=dev_id, uris=[spiffe], evidence=ev.encode("ascii"))
    doc: dict[str, Any] = {"format": REQUEST_FORMAT, "device_id": dev_id,
                           "trust_domain": trust_domain, "spiffe_id": spiffe,
                           "created_at": int(now), "csr": to_pem(csr)}
    if agents is not None:
        doc["agents"] = sorted(agents)
    return doc


def check_device_chain(chain: list[x509.Certificate], *, device_key: KeyHandle, trust_domain: str,
                       now: float) -> None:
    """Refuse a chain that is not for this device key, cannot issue agent
    certificates, is outside its validity, or is not linked by signatures."""
    if not chain:
        raise ChainRejected("empty", "no certificate in the chain")
    leaf = chain[0]
    if not same_public_key(device_key.public_key(), leaf.public_key()):
        raise ChainRejected("key_mismatch", "certificate is for another key")
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise ChainRejected("not_a_ca", "device certificate must be a CA (basicConstraints, "
                                        "keyUsage keyCertSign)") from None
    if not bc.ca or not ku.key_cert_sign or not ku.crl_sign:
        raise ChainRejected("not_a_ca", "device certificate must allow keyCertSign and cRLSign")
    for cert in chain:
        if cert.not_valid_after_utc.timestamp() <= now:
            raise ChainRejected("expired", "a certificate in the chain has expired")
        if cert.not_valid_before_utc.timestamp() > now + 300:
            raise ChainRejected("not_yet_valid", "a certificate in the chain is not yet valid")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except Exception:
            raise ChainRejected("broken_chain", "chain is not linked by signatures") from None
    expected = device_spiffe_id(trust_domain, device_id(device_key))
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if expected not in uris:
        raise ChainRejected("wrong_identity", "certificate does not name this device's SPIFFE ID")


@dataclass(frozen=True)
class ChainSummary:
    device_id: str
    spiffe_id: str
    subject: str
    issuer: str
    not_before: int
    not_after: int
    fingerprint_sha256: str


def summarize(chain: list[x509.Certificate], dev_id: str, spiffe: str) -> ChainSummary:
    leaf = chain[0]
    return ChainSummary(
        device_id=dev_id, spiffe_id=spiffe, subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        not_before=int(leaf.not_valid_before_utc.timestamp()),
        not_after=int(leaf.not_valid_after_utc.timestamp()),
        fingerprint_sha256=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest())


def jwk_json(key: ec.EllipticCurvePublicKey) -> str:
    jwk = ec_public_jwk(key)
    return json.dumps({**jwk, "kid": jwk_thumbprint(jwk), "use": "sig", "alg": "ES256"})
