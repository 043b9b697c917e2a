"""DPoP proofs (RFC 9449), minted with the agent's token key.

A DPoP proof binds one HTTP request (method ``htm`` + URI ``htu``, at time
``iat``, unique ``jti``) and optionally one access token (``ath``) and a
server nonce to the key in its ``jwk`` header. A resource server that sees
a token with ``cnf.jkt`` accepts it only with a fresh proof from the key
whose RFC 7638 thumbprint is that ``jkt`` -- so a stolen token, or a stolen
proof for another request, is useless.

Pure: no I/O; ``now`` and ``jti`` are arguments.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.core.jose import b64url, ec_public_jwk, encode_jws, jwk_thumbprint
from badged.keystore.port import KeyHandle

_logger = logging.getLogger(__name__)

DPOP_TYP = "dpop+jwt"
ES256 = ec.ECDSA(hashes.SHA256())
MAX_HTU = 2048
MAX_ACCESS_TOKEN = 16 * 1024
MAX_NONCE = 512
# RFC 9110 token characters: a method is a token.
_METHOD_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}$")
_NONCE_RE = re.compile(r"^[\x21-\x7e]+$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_htu(url: str) -> str:
    """The ``htu`` value: scheme and host lower-cased, default port dropped,
    query and fragment removed (RFC 9449 §4.2), empty path → ``/``.

    ValueError for anything that is not an absolute http(s) URI or that
    carries userinfo (credentials have no place in a proof).
    """
    if len(url) > MAX_HTU or not url.isascii() or any(c in url for c in " \t\r\n"):
        raise ValueError("htu must be at most 2048 printable ASCII chars")
    try:
        parts = urlsplit(url)
        _ = parts.hostname
    except ValueError:
        raise ValueError("htu is not a valid URI") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("htu must be an http or https URI")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ValueError("htu needs a host and no userinfo")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise ValueError("htu has an invalid port") from None
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", "", ""))


def check_method(htm: str) -> str:
    if not _METHOD_RE.match(htm):
        raise ValueError("htm must be an HTTP method token")
    return htm


def access_token_hash(access_token: str) -> str:
    """``ath``: base64url(SHA-256(ASCII of the access token))."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def proof_claims(*, htm: str, htu: str, now: float, jti: str, access_token: str | None = None,
                 nonce: str | None = None) -> dict[str, Any]:
    """Claims of one proof; every input validated, ValueError with the reason."""
    claims: dict[str, Any] = {"htm": check_method(htm), "htu": normalize_htu(htu),
                              "iat": int(now), "jti": jti}
    if access_token:
        if len(access_token) > MAX_ACCESS_TOKEN or not access_token.isascii():
            raise ValueError(f"access token must be at most {MAX_ACCESS_TOKEN} ASCII chars")
        claims["ath"] = access_token_hash(access_token)
    if nonce:
        if len(nonce) > MAX_NONCE or not _NONCE_RE.match(nonce):
            raise ValueError(f"nonce must be 1-{MAX_NONCE} printable ASCII chars")
        claims["nonce"] = nonce
    return claims


def mint_proof(claims: dict[str, Any], key: KeyHandle) -> str:
    """The proof JWS: ``typ`` dpop+jwt, the public key in ``jwk`` (no kid)."""
    header = {"typ": DPOP_TYP, "alg": "ES256", "jwk": ec_public_jwk(key.public_key())}
    return encode_jws(header, claims, lambda data: key.sign(data, ES256))


def jkt(key: ec.EllipticCurvePublicKey) -> str:
    """``cnf.jkt`` for tokens bound to ``key``: its RFC 7638 thumbprint."""
    return jwk_thumbprint(ec_public_jwk(key))
