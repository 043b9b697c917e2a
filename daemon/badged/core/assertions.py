"""Attested credential requests for external OAuth servers. Pure; clock passed in.

* RFC 7523 client assertions for ``private_key_jwt`` client authentication:
  ``iss`` = ``sub`` = client id, ``aud`` = the token endpoint (or AS issuer),
  ``exp`` seconds away, unique ``jti``; signed by the agent's token key,
  ``kid`` = its RFC 7638 thumbprint (as published in the JWKS). ``typ`` is
  ``client-authentication+jwt`` (draft-ietf-oauth-rfc7523bis, registered
  with IANA), not ``JWT``: the same key signs access tokens, and an
  assertion must never pass for one (access-token verifiers accept only
  ``JWT``/``at+jwt``). Which client id the agent may use is decided by the
  service (its own SPIFFE ID, or one the policy lists), never here.
* draft-ietf-oauth-attestation-based-client-auth: the *Client Attestation*
  (``typ`` ``oauth-client-attestation+jwt``) is issued by the device key --
  the attester -- for the agent key (``cnf.jwk``) and summarizes the
  attestation evidence in claims; the *Client Attestation PoP*
  (``typ`` ``oauth-client-attestation-pop+jwt``) is signed by the agent key
  per request, proving possession of the key the attestation names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.core.jose import ec_public_jwk, encode_jws, jwk_thumbprint
from badged.keystore.port import KeyHandle

_logger = logging.getLogger(__name__)

ES256 = ec.ECDSA(hashes.SHA256())
ASSERTION_TYP = "client-authentication+jwt"
ATTESTATION_TYP = "oauth-client-attestation+jwt"
ATTESTATION_POP_TYP = "oauth-client-attestation-pop+jwt"
MAX_ASSERTION_TTL = 300
MAX_ATTESTATION_TTL = 24 * 3600


def _window(now: float, ttl: int, cap: int) -> tuple[int, int]:
    if not 0 < ttl <= cap:
        raise ValueError(f"ttl must be 1..{cap} seconds")
    iat = int(now)
    return iat, iat + ttl


def client_assertion_claims(*, client_id: str, audience: str, now: float, ttl_seconds: int,
                            jti: str) -> dict[str, Any]:
    """RFC 7523 §3 claims; ``nbf`` = ``iat`` so a skewed server cannot pre-use it."""
    iat, exp = _window(now, ttl_seconds, MAX_ASSERTION_TTL)
    return {"iss": client_id, "sub": client_id, "aud": audience, "iat": iat, "nbf": iat,
            "exp": exp, "jti": jti}


def mint_client_assertion(claims: Mapping[str, Any], key: KeyHandle, key_id: str,
                          x5c: Sequence[str] = ()) -> str:
    """``x5c`` (agent certificate first) lets a server that trusts only the
    organization's root verify the assertion without a registered JWKS."""
    header: dict[str, Any] = {"alg": "ES256", "kid": key_id, "typ": ASSERTION_TYP}
    if x5c:
        header["x5c"] = list(x5c)
    return encode_jws(header, claims, lambda data: key.sign(data, ES256))


def client_attestation_claims(*, attester: str, client_id: str,
                              agent_key: ec.EllipticCurvePublicKey, now: float, ttl_seconds: int,
                              evidence: Mapping[str, Any]) -> dict[str, Any]:
    """The attestation: who attests (``iss``), for which client (``sub``),
    which key (``cnf.jwk``), and the evidence summary (``hwkey``, ``workload``,
    ``eat_profile``, and on a TPM the ``tpm2_certify`` itself) copied from the
    device-signed evidence claims."""
    iat, exp = _window(now, ttl_seconds, MAX_ATTESTATION_TTL)
    claims: dict[str, Any] = {"iss": attester, "sub": client_id, "iat": iat, "nbf": iat,
                              "exp": exp, "cnf": {"jwk": ec_public_jwk(agent_key)}}
    for name in ("eat_profile", "hwkey", "workload", "agent", "tpm2_certify"):
        if name in evidence:
            claims[name] = evidence[name]
    return claims


def mint_client_attestation(claims: Mapping[str, Any], device_key: KeyHandle,
                            x5c: Sequence[str] = ()) -> str:
    header: dict[str, Any] = {"alg": "ES256", "typ": ATTESTATION_TYP,
                              "kid": jwk_thumbprint(ec_public_jwk(device_key.public_key()))}
    if x5c:
        header["x5c"] = list(x5c)
    return encode_jws(header, claims, lambda data: device_key.sign(data, ES256))


def attestation_pop_claims(*, client_id: str, audience: str, now: float, ttl_seconds: int,
                           jti: str, challenge: str | None = None) -> dict[str, Any]:
    """PoP claims: ``iss`` (client id), ``aud`` (the AS), ``jti``, ``iat``,
    short ``exp``, and the server's ``challenge`` when it sent one."""
    iat, exp = _window(now, ttl_seconds, MAX_ASSERTION_TTL)
    claims: dict[str, Any] = {"iss": client_id, "aud": audience, "jti": jti, "iat": iat,
                              "exp": exp}
    if challenge:
        claims["challenge"] = challenge
    return claims


def mint_attestation_pop(claims: Mapping[str, Any], agent_key: KeyHandle) -> str:
    header = {"alg": "ES256", "typ": ATTESTATION_POP_TYP}
    return encode_jws(header, claims, lambda data: agent_key.sign(data, ES256))
