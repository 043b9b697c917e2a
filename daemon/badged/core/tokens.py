"""Minting access tokens: a pure function of the request, the clock and a key.

No sockets, files or devices here. ``now``, ``jti`` and the signing key are
arguments, so every expiry and claim rule is tested with plain tables
(tests/unit/test_tokens.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.core.jose import b64url, canonical_json, encode_jws_raw, encode_jws_with_header
from badged.keystore.port import KeyHandle

ES256 = ec.ECDSA(hashes.SHA256())
# Access tokens keep ``typ: JWT``: stock SPIFFE libraries accept only "JWT"
# or "JOSE" on a JWT-SVID, and every badged access token is one. What makes
# them distinct is that nothing else badged signs with an agent key says
# "JWT" any more: client assertions are ``client-authentication+jwt``
# (draft-ietf-oauth-rfc7523bis), attestation PoPs and DPoP proofs have their
# own types, so verifiers that accept only ACCESS_TOKEN_TYPS refuse them.
TOKEN_TYP = "JWT"  # noqa: S105 -- a JOSE header value, not a secret
ACCESS_TOKEN_TYPS: frozenset[str | None] = frozenset({TOKEN_TYP, "at+jwt"})
# The JWKS member that names the agent a key belongs to (its SPIFFE ID): a
# verifier checks the token's sub (or act.sub) against the key that signed.
JWK_AGENT_MEMBER = "badged_agent"
# The JWK Set member carrying the daemon's issuer, which access tokens must name.
JWKS_ISSUER_MEMBER = "badged_issuer"


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    issued_at: int
    expires_at: int
    key_id: str
    claims: Mapping[str, Any]


def build_claims(
    *,
    issuer: str,
    subject: str,
    audience: str | Sequence[str],
    scopes: Sequence[str],
    ttl_seconds: int,
    now: float,
    jti: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The claim set of an access token (RFC 7519, JWT-SVID compatible)."""
    if ttl_seconds <= 0:
        raise ValueError("ttl must be positive")
    iat = int(now)
    aud: str | list[str] = audience if isinstance(audience, str) else list(audience)
    if isinstance(aud, list) and len(aud) == 1:
        aud = aud[0]  # RFC 7519: a single audience may be a plain string
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": aud,
        "iat": iat,
        "nbf": iat,
        "exp": iat + ttl_seconds,
        "jti": jti,
    }
    if scopes:
        claims["scope"] = " ".join(scopes)
    if extra:
        overlap = set(extra) & set(claims)
        if overlap:
            raise ValueError(f"extra claims may not override {sorted(overlap)}")
        claims.update(extra)
    return claims


@functools.lru_cache(maxsize=1024)
def _header_segment(key_id: str) -> str:
    """The base64url JWS header of a token signed by ``key_id``: constant per key."""
    return b64url(canonical_json({"alg": "ES256", "kid": key_id, "typ": TOKEN_TYP}))


def mint_token(*, claims: Mapping[str, Any], key: KeyHandle, key_id: str) -> IssuedToken:
    """Sign ``claims`` as an ES256 JWS with the agent's token key."""
    sign_raw = getattr(key, "sign_raw", None)
    if sign_raw is not None:  # the backend returns r||s itself (see RawSigner)
        token = encode_jws_raw(_header_segment(key_id), claims,
                               lambda data: sign_raw(data, ES256))
    else:
        token = encode_jws_with_header(_header_segment(key_id), claims,
                                       lambda data: key.sign(data, ES256))
    return IssuedToken(
        token=token,
        jti=str(claims["jti"]),
        issued_at=int(claims["iat"]),
        expires_at=int(claims["exp"]),
        key_id=key_id,
        claims=claims,
    )
