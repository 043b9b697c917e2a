"""Session-key certifications: the hardware agent key vouches for an in-memory key.

Why: a real TPM signs about 5 times a second (FINDINGS §3), far below what
agents ask for. In session mode the agent's hardware *token key* signs one
small statement every few minutes -- "this P-256 public key may sign tokens
for this SPIFFE ID from ``nbf`` to ``use_until``; tokens it signs expire by
``exp``" -- and the short-lived in-memory key signs the tokens.

The statement is a compact JWS, so it is JOSE-native and needs no X.509::

    header  {"alg": "ES256", "kid": <RFC 7638 thumbprint of the hardware key>,
             "typ": "badged-session-key+jwt"}
    payload {"iss": <badged issuer>, "agent": <agent SPIFFE ID>,
             "cnf": {"jwk": <session public JWK>},          (RFC 7800)
             "iat": t, "nbf": t, "use_until": t + period, "exp": t + period + max_ttl + leeway}

The JWKS publishes the session public key (``kid`` = its thumbprint) with this
JWS in the ``badged_cert`` member, so a stock JOSE library verifies tokens
against the JWKS unchanged, and a relying party that pinned the hardware key
(e.g. from TPM2_Certify attestation) checks the chain with
``badgeclient.session_verify``. docs/tpm.md describes the checks.

``typ`` is the domain separation: the hardware token key signs tokens (typ
``JWT``), client assertions and these statements, and only these carry
``badged-session-key+jwt``, which the verifier requires. The other way round,
a certification is public (it is in the JWKS) and signed by a key relying
parties trust for tokens, so it must never pass as a token even where ``typ``
is not checked: it has no ``sub``, ``aud``, ``jti`` or ``scope`` (the agent
is in ``agent``, not ``sub``).

Pure: no files, sockets or clock reads; ``now`` and the signer are arguments.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from badged.core.jose import b64url_decode, ec_public_jwk, encode_jws, jwk_thumbprint

CERT_TYP = "badged-session-key+jwt"
JWKS_MEMBER = "badged_cert"
ES256 = ec.ECDSA(hashes.SHA256())
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_JWK_MEMBERS = ("kty", "crv", "x", "y")
MAX_CERT_BYTES = 4096


class CertificationError(ValueError):
    """A certification that must not be trusted; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Schedule:
    """When a session key is made, used, retired and unpublished.

    The key signs during ``[created, created + period)``; a token it signs
    lives at most ``max_ttl``; relying parties allow ``leeway`` on ``exp``.
    So the certification (and the JWKS entry) must outlive the last token:
    ``exp = created + period + max_ttl + leeway``. Rotation is attempted from
    half the period on, so a hardware hiccup at that moment costs nothing: the
    current key keeps signing until ``use_until``.
    """

    period: int
    max_ttl: int
    leeway: int = 30

    def __post_init__(self) -> None:
        if self.period < 1 or self.max_ttl < 1 or self.leeway < 0:
            raise ValueError("period and max_ttl must be positive, leeway >= 0")

    def rotate_at(self, created: int) -> int:
        return created + max(1, self.period // 2)

    def use_until(self, created: int) -> int:
        return created + self.period

    def expires_at(self, created: int) -> int:
        return created + self.period + self.max_ttl + self.leeway


@dataclass(frozen=True)
class Certification:
    """What a verified certification says."""

    issuer: str
    subject: str
    session_jwk: Mapping[str, str]
    session_kid: str
    hardware_kid: str
    issued_at: int
    not_before: int
    use_until: int
    expires_at: int


def public_key_from_jwk(jwk: Mapping[str, str]) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a JWK this daemon published (``ec_public_jwk``)."""
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise CertificationError("malformed", "only EC P-256 keys")
    try:
        x, y = b64url_decode(jwk["x"]), b64url_decode(jwk["y"])
        return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                             ec.SECP256R1()).public_key()
    except (KeyError, ValueError, binascii.Error):
        raise CertificationError("malformed", "bad P-256 JWK") from None


def certification_claims(*, issuer: str, subject: str, session_key: ec.EllipticCurvePublicKey,
                         created: int, schedule: Schedule) -> dict[str, Any]:
    """The payload the hardware key signs (see the module docstring)."""
    return {
        "iss": issuer,
        "agent": subject,
        "cnf": {"jwk": ec_public_jwk(session_key)},
        "iat": created,
        "nbf": created,
        "use_until": schedule.use_until(created),
        "exp": schedule.expires_at(created),
    }


def mint_certification(claims: Mapping[str, Any], *, hardware_kid: str,
                       sign_der: Callable[[bytes], bytes]) -> str:
    """Sign ``claims`` with the hardware key (``sign_der`` returns DER ECDSA)."""
    header = {"alg": "ES256", "kid": hardware_kid, "typ": CERT_TYP}
    return encode_jws(header, claims, sign_der)


def _json_object(part: str, what: str) -> dict[str, Any]:
    if not _B64URL.match(part):
        raise CertificationError("malformed", f"{what} is not base64url")
    try:
        value = json.loads(b64url_decode(part))
    except (ValueError, binascii.Error):
        raise CertificationError("malformed", f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise CertificationError("malformed", f"{what} is not an object")
    return value


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CertificationError("malformed", f"{name} must be an integer")
    return value


def verify_certification(cert: str, *, hardware_key: ec.EllipticCurvePublicKey,
                         session_jwk: Mapping[str, str], now: float,
                         expected_subject: str | None = None,
                         expected_hardware_kid: str | None = None,
                         leeway: int = 30) -> Certification:
    """Check one certification against a hardware key the caller trusts.

    Refuses (``CertificationError.reason``): ``malformed``, ``wrong_type``
    (not a session-key statement), ``wrong_key`` (kid or signature do not
    match the hardware key), ``jwk_mismatch`` (certifies another key),
    ``wrong_subject`` (another agent), ``not_yet_valid``, ``expired``.
    """
    if len(cert) > MAX_CERT_BYTES:
        raise CertificationError("malformed", "too long")
    parts = cert.split(".")
    if len(parts) != 3:
        raise CertificationError("malformed", "not a compact JWS")
    header = _json_object(parts[0], "header")
    claims = _json_object(parts[1], "payload")
    if header.get("alg") != "ES256" or "crit" in header:
        raise CertificationError("malformed", "alg must be ES256, no crit")
    if header.get("typ") != CERT_TYP:
        raise CertificationError("wrong_type", f"typ must be {CERT_TYP}")
    kid = header.get("kid")
    hw_kid = jwk_thumbprint(ec_public_jwk(hardware_key))
    if kid != hw_kid or (expected_hardware_kid is not None and kid != expected_hardware_kid):
        raise CertificationError("wrong_key", "signed by another hardware key")
    if not _B64URL.match(parts[2]):
        raise CertificationError("malformed", "signature is not base64url")
    raw = b64url_decode(parts[2])
    if len(raw) != 64:
        raise CertificationError("malformed", "ES256 signature must be 64 bytes")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        hardware_key.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), ES256)
    except InvalidSignature:
        raise CertificationError("wrong_key", "signature does not verify") from None
    cnf = claims.get("cnf")
    certified = cnf.get("jwk") if isinstance(cnf, dict) else None
    if not isinstance(certified, dict):
        raise CertificationError("malformed", "cnf.jwk missing")
    if any(certified.get(m) != session_jwk.get(m) for m in _JWK_MEMBERS):
        raise CertificationError("jwk_mismatch", "certifies another key")
    subject, issuer = claims.get("agent"), claims.get("iss")
    if not isinstance(subject, str) or not isinstance(issuer, str):
        raise CertificationError("malformed", "agent and iss must be strings")
    if expected_subject is not None and subject != expected_subject:
        raise CertificationError("wrong_subject", "certified for another agent")
    iat, nbf = _int_claim(claims, "iat"), _int_claim(claims, "nbf")
    use_until, exp = _int_claim(claims, "use_until"), _int_claim(claims, "exp")
    if not nbf <= use_until <= exp:
        raise CertificationError("malformed", "needs nbf <= use_until <= exp")
    if now + leeway < nbf:
        raise CertificationError("not_yet_valid", "nbf is in the future")
    if now - leeway >= exp:
        raise CertificationError("expired", "certification has expired")
    session_kid = jwk_thumbprint({m: str(certified[m]) for m in _JWK_MEMBERS})
    return Certification(issuer=issuer, subject=subject,
                         session_jwk={m: str(certified[m]) for m in _JWK_MEMBERS},
                         session_kid=session_kid, hardware_kid=hw_kid, issued_at=iat,
                         not_before=nbf, use_until=use_until, expires_at=exp)
