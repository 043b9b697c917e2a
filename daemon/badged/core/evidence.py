"""Key-attestation evidence for PKCS#11 keys: what the token says, signed.

A PKCS#11 token cannot quote like a TPM, so badged's evidence (SPEC
"Attestation evidence") is the key's attributes *as read back from the
token* (``CKA_SENSITIVE``, ``CKA_EXTRACTABLE``, ``CKA_NEVER_EXTRACTABLE``,
``CKA_LOCAL``) and the token's identity, bound to the attested public key
(``cnf.jwk``) and signed by the device key. Its claims follow RFC 9711 (EAT)
where a name exists (``eat_profile``, ``eat_nonce``, ``iat``/``exp``).

What it proves depends on who trusts the device key: after enrollment the
operator CA vouched (from the device's own self-attested evidence, checked
when signing) that the device key is a non-extractable token key, so an
evidence JWS verified through the device certificate says "the device that
CA enrolled reports that this key was generated in its token and cannot
leave it". It does not protect against root on the device.

Pure: no I/O; ``now`` is an argument.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.core.jose import b64url_decode, ec_public_jwk, encode_jws, jwk_thumbprint
from badged.keystore.attest import FORMAT_TPM2_CERTIFY, KeyAttestation
from badged.keystore.port import KeyHandle, KeyProperties

_logger = logging.getLogger(__name__)

EVIDENCE_TYP = "badged-key-attestation+jwt"
PKCS11_PROFILE = "urn:badged:eat:pkcs11-key:v1"
# A TPM key's attributes as the TPM reports them (ReadPublic), signed by the
# device key. TPM2_Certify evidence (KeyAttester) is a stronger, separate
# profile once the TPM attester lands.
TPM_ATTRIBUTES_PROFILE = "urn:badged:eat:tpm-key-attributes:v1"
# The TPM's own word: a TPM2_Certify of the attested key by an attestation
# key, over a nonce derived from this evidence (so it cannot be lifted into
# another one). Checked with badged.core.tpm_evidence.
TPM2_CERTIFY_PROFILE = "urn:badged:eat:tpm2-certify:v1"
PROFILES = {"pkcs11": PKCS11_PROFILE, "tpm": TPM_ATTRIBUTES_PROFILE}
# What the evidence is, said plainly in the ``statement`` claim: the key's
# attributes as the token (or TPM) reports them, signed only by the device key
# -- the token's own statement, which root on the host can make up; or a
# TPM2_Certify, the TPM's own statement, worth what its AK is worth (an AK
# activated against a pinned EK CA, docs/credentials.md).
STATEMENT_TOKEN = "token-statement"  # noqa: S105 - a label, not a secret
STATEMENT_TPM2_CERTIFY = "tpm2-certify"
KNOWN_PROFILES = frozenset({*PROFILES.values(), TPM2_CERTIFY_PROFILE})
_CERTIFY_FIELDS = ("attest", "signature", "ak_public", "key_public", "ek_certificate")

Certifier = Callable[[bytes], KeyAttestation]
"""Given the nonce, certify the attested key in the TPM (KeyAttester.attest)."""


def certify_nonce(*, attested: ec.EllipticCurvePublicKey, iat: int, eat_nonce: str | None) -> bytes:
    """TPM2_Certify ``extraData`` for one evidence: a verifier recomputes it
    from the claims, so a certify made for other evidence does not verify."""
    thumb = jwk_thumbprint(ec_public_jwk(attested))
    data = b"badged-evidence-v1\x00" + f"{thumb}\x00{iat}\x00{eat_nonce or ''}".encode()
    return hashlib.sha256(data).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
ES256 = ec.ECDSA(hashes.SHA256())
MAX_EVIDENCE_TTL = 30 * 86400


class EvidenceError(ValueError):
    """Evidence that does not prove what it must; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def hwkey_claims(props: KeyProperties) -> dict[str, Any]:
    """The attribute summary plus the backend's public extras (PKCS#11: the
    redacted token URI as ``token_uri``, never a PIN; TPM: the key's Name and
    object attributes)."""
    extra = {("token_uri" if k == "token" else k): v for k, v in sorted(props.extra.items())}
    return {
        **extra,
        "backend": props.backend,
        "sensitive": props.sensitive,
        "extractable": props.extractable,
        "never_extractable": props.never_extractable,
        "local": props.local,
    }


def build_evidence_claims(*, issuer: str, subject: str, attested: ec.EllipticCurvePublicKey,
                          props: KeyProperties, now: float, ttl_seconds: int,
                          nonce: str | None = None,
                          workload: Mapping[str, Any] | None = None,
                          certify: Certifier | None = None) -> dict[str, Any]:
    """``certify``: present when the key store is a KeyAttester (TPM); the
    evidence then carries the TPM2_Certify and says so in ``eat_profile``."""
    if not 0 < ttl_seconds <= MAX_EVIDENCE_TTL:
        raise ValueError("evidence ttl out of range")
    iat = int(now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "iat": iat,
        "exp": iat + ttl_seconds,
        "eat_profile": PROFILES.get(props.backend, f"urn:badged:eat:{props.backend}-key:v1"),
        "cnf": {"jwk": ec_public_jwk(attested)},
        "hwkey": hwkey_claims(props),
        "statement": STATEMENT_TOKEN,
    }
    if nonce:
        claims["eat_nonce"] = nonce
    if workload:
        claims["workload"] = dict(workload)
    if certify is not None:
        att = certify(certify_nonce(attested=attested, iat=iat, eat_nonce=nonce))
        claims["eat_profile"] = TPM2_CERTIFY_PROFILE
        claims["statement"] = STATEMENT_TPM2_CERTIFY
        claims["tpm2_certify"] = {f: _b64(getattr(att, f)) for f in _CERTIFY_FIELDS
                                  if getattr(att, f) is not None}
    return claims


def sign_evidence(claims: Mapping[str, Any], *, device_key: KeyHandle,
                  x5c: Sequence[str] = ()) -> str:
    """JWS by the device key; ``x5c`` (base64 DER, leaf first) once enrolled."""
    header: dict[str, Any] = {"alg": "ES256", "typ": EVIDENCE_TYP,
                              "kid": jwk_thumbprint(ec_public_jwk(device_key.public_key()))}
    if x5c:
        header["x5c"] = list(x5c)
    return encode_jws(header, claims, lambda data: device_key.sign(data, ES256))


def check_evidence(token: str, *, signer: ec.EllipticCurvePublicKey,
                   attested: ec.EllipticCurvePublicKey, now: float, skew: int = 60,
                   trusted_ak_names: Collection[bytes] | None = None,
                   ek_ca_keys: Sequence[Any] | None = None) -> dict[str, Any]:
    """Verify evidence for a CA: signature, binding to ``attested``, attributes.

    Used by ``badgectl ca sign`` before it signs anything. Raises
    :class:`EvidenceError` with a stable reason: ``bad_signature``,
    ``key_mismatch`` (evidence for another key), ``expired``,
    ``not_sensitive`` / ``extractable`` / ``not_generated_in_token``,
    ``tpm_certify_invalid`` (TPM profile: see badged.core.tpm_evidence;
    ``trusted_ak_names`` / ``ek_ca_keys`` are passed through to it), ...
    """
    import json

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    parts = token.split(".")
    if len(parts) != 3 or len(token) > 16 * 1024:
        raise EvidenceError("malformed", "not a compact JWS")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        sig = b64url_decode(parts[2])
    except ValueError:
        raise EvidenceError("malformed", "bad base64url or JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise EvidenceError("malformed", "header and claims must be objects")
    if header.get("alg") != "ES256" or header.get("typ") != EVIDENCE_TYP:
        raise EvidenceError("wrong_type", "alg must be ES256 and typ " + EVIDENCE_TYP)
    if len(sig) != 64:
        raise EvidenceError("bad_signature", "signature length")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        signer.verify(der, (parts[0] + "." + parts[1]).encode("ascii"), ES256)
    except InvalidSignature:
        raise EvidenceError("bad_signature", "evidence not signed by the expected key") from None
    cnf = claims.get("cnf")
    jwk = cnf.get("jwk") if isinstance(cnf, dict) else None
    try:
        same = isinstance(jwk, dict) and jwk_thumbprint(jwk) == jwk_thumbprint(ec_public_jwk(attested))
    except (KeyError, TypeError):
        same = False
    if not same:
        raise EvidenceError("key_mismatch", "evidence is for another key")
    exp, iat = claims.get("exp"), claims.get("iat")
    if type(exp) is not int or type(iat) is not int:  # bool is an int subclass
        raise EvidenceError("malformed", "iat and exp are required integers")
    if now > exp + skew:
        raise EvidenceError("expired", "evidence has expired")
    if iat > now + skew:
        raise EvidenceError("not_yet_valid", "evidence issued in the future")
    profile = claims.get("eat_profile")
    if not isinstance(profile, str) or profile not in KNOWN_PROFILES:
        raise EvidenceError("unknown_profile", "unsupported eat_profile")
    statement = claims.get("statement")  # absent in evidence made before the label
    expected = STATEMENT_TPM2_CERTIFY if profile == TPM2_CERTIFY_PROFILE else STATEMENT_TOKEN
    if statement is not None and statement != expected:
        raise EvidenceError("wrong_statement", "statement does not match the evidence profile")
    if profile == TPM2_CERTIFY_PROFILE:
        _check_certify(claims, attested=attested, iat=iat, trusted_ak_names=trusted_ak_names,
                       ek_ca_keys=ek_ca_keys)
    hw = claims.get("hwkey")
    if not isinstance(hw, dict):
        raise EvidenceError("malformed", "hwkey claim missing")
    if hw.get("sensitive") is not True:
        raise EvidenceError("not_sensitive", "key is not CKA_SENSITIVE")
    if hw.get("extractable") is not False or hw.get("never_extractable") is not True:
        raise EvidenceError("extractable", "key is or was extractable")
    if hw.get("local") is not True:
        raise EvidenceError("not_generated_in_token", "key was imported, not generated (CKA_LOCAL)")
    return claims


def _check_certify(claims: Mapping[str, Any], *, attested: ec.EllipticCurvePublicKey, iat: int,
                   trusted_ak_names: Collection[bytes] | None,
                   ek_ca_keys: Sequence[Any] | None) -> None:
    from badged.core import tpm_evidence
    from badged.errors import AttestationError

    raw = claims.get("tpm2_certify")
    if not isinstance(raw, dict):
        raise EvidenceError("malformed", "tpm2_certify claim missing")
    try:
        fields = {f: b64url_decode(raw[f]) if raw.get(f) is not None else None
                  for f in _CERTIFY_FIELDS}
    except (TypeError, ValueError):
        raise EvidenceError("malformed", "tpm2_certify fields are not base64url") from None
    if any(fields[f] is None for f in _CERTIFY_FIELDS[:4]):
        raise EvidenceError("malformed", "tpm2_certify is incomplete")
    eat_nonce = claims.get("eat_nonce")
    if eat_nonce is not None and not isinstance(eat_nonce, str):
        raise EvidenceError("malformed", "eat_nonce must be a string")
    nonce = certify_nonce(attested=attested, iat=iat, eat_nonce=eat_nonce)
    att = KeyAttestation(format=FORMAT_TPM2_CERTIFY, key_name="", nonce=nonce,
                         attest=fields["attest"] or b"", signature=fields["signature"] or b"",
                         ak_public=fields["ak_public"] or b"", key_public=fields["key_public"] or b"",
                         ek_certificate=fields["ek_certificate"])
    try:
        tpm_evidence.verify_certify(att, nonce, trusted_ak_names=trusted_ak_names,
                                    expected_public_key=attested, ek_ca_keys=ek_ca_keys)
    except AttestationError as exc:
        raise EvidenceError("tpm_certify_invalid", str(exc)) from None
