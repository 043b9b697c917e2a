"""Chain check for tokens signed in session-key mode, for relying parties.

In session mode (docs/tpm.md, "Session-key mode") a badged token is signed by
a short-lived in-memory key; the agent's *hardware* key (TPM or PKCS#11)
certified that key. The JWKS publishes the session key like any other key,
so a stock JOSE library verifies the token signature against it. This module
adds the check that ties the token back to the hardware:

1. the token's ``kid`` names a JWKS entry carrying ``badged_cert``, a compact
   JWS with ``typ`` ``badged-session-key+jwt``;
2. that JWS verifies with the hardware key -- one the caller pinned (best:
   the key a TPM2_Certify attestation proved TPM-resident), or the JWKS entry
   named by its ``kid`` (then the chain adds binding, not independent trust);
3. its ``cnf.jwk`` is exactly the session key, and the token verifies with it;
4. the token's agent (``act.sub`` when delegated, else ``sub``) is the
   certification's ``agent``: a session key certified for one agent cannot
   speak for another;
5. the token was issued while the key was allowed to sign
   (``nbf <= iat <= use_until``) and expires before the certification
   (``exp <= cert exp``); the certification itself is valid now.

Only ``cryptography`` and the standard library: no daemon imports, so a
relying party can vendor this file. Every refusal is a
:class:`SessionChainError` with a stable ``reason``.

Example::

    from joserfc import jwt
    from joserfc.jwk import KeySet
    from badgeclient.session_verify import verify_session_chain

    claims = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"]).claims
    chain = verify_session_chain(token, jwks, now=time.time(),
                                 hardware_keys={agent_kid: attested_public_key})
    chain.agent, chain.hardware_kid
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

CERT_TYP = "badged-session-key+jwt"
JWKS_MEMBER = "badged_cert"
MAX_BYTES = 16 * 1024
_ES256 = ec.ECDSA(hashes.SHA256())
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_MEMBERS = ("crv", "kty", "x", "y")  # RFC 7638 order


class SessionChainError(ValueError):
    """The chain from token to hardware key does not hold.

    ``reason``: ``malformed``, ``unknown_kid``, ``not_session_key``,
    ``untrusted_hardware_key``, ``bad_certification``, ``jwk_mismatch``,
    ``bad_signature``, ``wrong_agent``, ``outside_window``, ``expired``,
    ``not_yet_valid``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class SessionChain:
    """A verified chain: token → session key → hardware key."""

    agent: str
    session_kid: str
    hardware_kid: str
    issuer: str
    claims: Mapping[str, Any]
    cert_expires_at: int
    use_until: int


def _b64decode(part: str, what: str) -> bytes:
    if not _B64URL.match(part):
        raise SessionChainError("malformed", f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (ValueError, binascii.Error):
        raise SessionChainError("malformed", f"{what} is not base64url") from None


def _object(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(part, what))
    except ValueError:
        raise SessionChainError("malformed", f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise SessionChainError("malformed", f"{what} is not an object")
    return value


def _split(jws: str, what: str) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    if not isinstance(jws, str) or len(jws) > MAX_BYTES:
        raise SessionChainError("malformed", f"{what} too long or not text")
    parts = jws.split(".")
    if len(parts) != 3:
        raise SessionChainError("malformed", f"{what} is not a compact JWS")
    header = _object(parts[0], f"{what} header")
    if header.get("alg") != "ES256" or "crit" in header:
        raise SessionChainError("malformed", f"{what}: alg must be ES256, no crit")
    return parts, header, _object(parts[1], f"{what} payload")


def _verify(parts: list[str], key: ec.EllipticCurvePublicKey) -> bool:
    raw = _b64decode(parts[2], "signature")
    if len(raw) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        key.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), _ES256)
    except InvalidSignature:
        return False
    return True


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint of a P-256 JWK."""
    required = {m: jwk[m] for m in _MEMBERS}
    digest = hashlib.sha256(json.dumps(required, separators=(",", ":"), sort_keys=True).encode())
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")


def jwk_to_key(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise SessionChainError("malformed", "only EC P-256 keys")
    x = _b64decode(str(jwk.get("x", "")), "x")
    y = _b64decode(str(jwk.get("y", "")), "y")
    if len(x) != 32 or len(y) != 32:
        raise SessionChainError("malformed", "bad P-256 coordinates")
    try:
        return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                             ec.SECP256R1()).public_key()
    except ValueError:
        raise SessionChainError("malformed", "point not on P-256") from None


def _int(claims: Mapping[str, Any], name: str, what: str) -> int:
    value = claims.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SessionChainError("malformed", f"{what}: {name} must be an integer")
    return value


def verify_session_chain(
    token: str,
    jwks: Mapping[str, Any],
    *,
    now: float,
    hardware_keys: Mapping[str, ec.EllipticCurvePublicKey] | None = None,
    leeway: int = 30,
) -> SessionChain:
    """Verify the token's signature and its chain to a hardware key.

    ``hardware_keys`` maps RFC 7638 thumbprints to public keys the relying
    party trusts on its own (pinned); when ``None``, the hardware key is
    taken from ``jwks`` (a non-session entry), which is only as trustworthy
    as the channel the JWKS came from. ``now`` is passed in so tests and
    replays can check at any time; ``leeway`` (seconds) absorbs clock skew.
    """
    parts, header, claims = _split(token, "token")
    kid = header.get("kid")
    entries = [k for k in jwks.get("keys", []) if isinstance(k, dict)]
    entry = next((k for k in entries if k.get("kid") == kid), None)
    if entry is None:
        raise SessionChainError("unknown_kid", "token kid is not in the JWKS")
    cert = entry.get(JWKS_MEMBER)
    if not isinstance(cert, str):
        raise SessionChainError("not_session_key", "JWKS entry has no certification")
    session_key = jwk_to_key(entry)
    if thumbprint(entry) != kid:
        raise SessionChainError("malformed", "JWKS kid is not the key's thumbprint")

    cparts, cheader, cclaims = _split(cert, "certification")
    if cheader.get("typ") != CERT_TYP:
        raise SessionChainError("bad_certification", f"typ must be {CERT_TYP}")
    hw_kid = cheader.get("kid")
    if not isinstance(hw_kid, str):
        raise SessionChainError("bad_certification", "no kid")
    if hardware_keys is not None:
        hw_key = hardware_keys.get(hw_kid)
        if hw_key is None:
            raise SessionChainError("untrusted_hardware_key", "hardware key is not pinned")
    else:
        hw_entry = next((k for k in entries if k.get("kid") == hw_kid), None)
        if hw_entry is None or JWKS_MEMBER in hw_entry:
            raise SessionChainError("untrusted_hardware_key", "hardware key not in the JWKS")
        hw_key = jwk_to_key(hw_entry)
        if thumbprint(hw_entry) != hw_kid:
            raise SessionChainError("malformed", "hardware kid is not the key's thumbprint")
    if not _verify(cparts, hw_key):
        raise SessionChainError("bad_certification", "not signed by the hardware key")
    cnf = cclaims.get("cnf")
    certified = cnf.get("jwk") if isinstance(cnf, dict) else None
    if not isinstance(certified, dict) or any(certified.get(m) != entry.get(m) for m in _MEMBERS):
        raise SessionChainError("jwk_mismatch", "certification is for another key")
    if not _verify(parts, session_key):
        raise SessionChainError("bad_signature", "token does not verify with the session key")

    if any(name in cclaims for name in ("sub", "aud", "jti", "scope")):
        raise SessionChainError("bad_certification", "a certification carries no token claims")
    subject, issuer = cclaims.get("agent"), cclaims.get("iss")
    if not isinstance(subject, str) or not isinstance(issuer, str):
        raise SessionChainError("malformed", "certification agent/iss")
    act = claims.get("act")
    agent = act.get("sub") if isinstance(act, dict) else claims.get("sub")
    if agent != subject:
        raise SessionChainError("wrong_agent", "token agent is not the certified agent")
    if claims.get("iss") != issuer:
        raise SessionChainError("wrong_agent", "token issuer is not the certifying issuer")
    nbf = _int(cclaims, "nbf", "certification")
    use_until = _int(cclaims, "use_until", "certification")
    cexp = _int(cclaims, "exp", "certification")
    iat, exp = _int(claims, "iat", "token"), _int(claims, "exp", "token")
    if not nbf <= iat <= use_until or exp > cexp:
        raise SessionChainError("outside_window", "token issued or expiring outside the key's window")
    if now + leeway < nbf:
        raise SessionChainError("not_yet_valid", "certification not yet valid")
    if now - leeway >= cexp or now - leeway >= exp:
        raise SessionChainError("expired", "token or certification expired")
    return SessionChain(agent=subject, session_kid=kid, hardware_kid=hw_kid, issuer=issuer,
                        claims=claims, cert_expires_at=cexp, use_until=use_until)
