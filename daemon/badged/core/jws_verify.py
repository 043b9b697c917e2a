"""Verify the ES256 tokens badged itself minted (SPIFFE ValidateJWTSVID).

Pure: keys, audience and ``now`` are arguments. Only what badged mints is
accepted -- compact JWS, ``alg`` ES256 (checked before any key is used, so
``none`` and algorithm confusion cannot get in), a known ``kid`` -- and every
failure is an InvalidRequestError whose public text is safe to return (it
describes the caller's own token, never key material).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from badged.core.jose import b64url_decode
from badged.errors import InvalidRequestError

MAX_TOKEN = 16 * 1024


def _fail(reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"JWT-SVID rejected: {reason}", public=f"invalid JWT-SVID: {reason}")


def _segment(text: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(text))
    except (ValueError, UnicodeDecodeError):
        raise _fail("malformed encoding") from None
    if not isinstance(value, dict):
        raise _fail("malformed JSON")
    return value


def verify_es256(token: str, *, keys: Mapping[str, ec.EllipticCurvePublicKey], audience: str,
                 now: float, skew: int = 30, typs: frozenset[str | None] | None = None,
                 issuer: str | None = None,
                 key_agents: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Claims of a valid token for ``audience``; raises InvalidRequestError otherwise.

    ``typs``: the JOSE ``typ`` values accepted (an access token is not a
    client assertion signed by the same key). ``issuer``: the required ``iss``.
    ``key_agents``: kid → the SPIFFE ID of the agent that key belongs to; the
    token's ``sub`` (or ``act.sub`` when delegated) must be that agent.
    """
    if len(token) > MAX_TOKEN:
        raise _fail("too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise _fail("not a compact JWS")
    header, claims = _segment(parts[0]), _segment(parts[1])
    if header.get("alg") != "ES256":
        raise _fail("algorithm must be ES256")
    if typs is not None and header.get("typ") not in typs:
        raise _fail("not an access token (typ)")
    key = keys.get(str(header.get("kid")))
    if key is None:
        raise _fail("unknown key id")
    try:
        sig = b64url_decode(parts[2])
    except ValueError:
        raise _fail("malformed signature") from None
    if len(sig) != 64:
        raise _fail("malformed signature")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, UnicodeEncodeError):
        raise _fail("bad signature") from None
    exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
    if not isinstance(exp, int) or exp + skew < now:
        raise _fail("expired")
    if isinstance(nbf, int) and nbf - skew > now:
        raise _fail("not yet valid")
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if audience not in auds:
        raise _fail("audience mismatch")
    if not isinstance(claims.get("sub"), str):
        raise _fail("no subject")
    if issuer is not None and claims.get("iss") != issuer:
        raise _fail("issuer mismatch")
    if key_agents is not None:
        act = claims.get("act")
        agent = act.get("sub") if isinstance(act, dict) else claims["sub"]
        if key_agents.get(str(header.get("kid"))) != agent:
            raise _fail("signed by another agent's key")
    return claims
