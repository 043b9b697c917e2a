"""Minimal JOSE encoding: exactly what badged mints, nothing it must parse.

We only *produce* JWS compact tokens (ES256), JWKs and RFC 7638 thumbprints.
Verification in tests, the demo and relying parties uses an independent
library (joserfc), so a bug here cannot be masked by the same code on both
sides.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from badged.core.jsonenc import ORJSON_SORTED, sorted_compact_encoder

_P256_BYTES = 32


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url(data: bytes) -> str:
    # binascii + translate is what base64.urlsafe_b64encode does, minus two
    # Python-level calls; the result is identical (unpadded base64url).
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
_encode = sorted_compact_encoder(ensure_ascii=False, allow_nan=True)


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON with sorted keys: stable bytes for hashing and signing."""
    return _encode(obj).encode()


def ec_public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """RFC 7517 JWK (public members only) of a P-256 key."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("only P-256 keys are supported")
    numbers = key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(_P256_BYTES, "big")),
        "y": b64url(numbers.y.to_bytes(_P256_BYTES, "big")),
    }


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members in lexicographic order."""
    required = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    return b64url(hashlib.sha256(canonical_json(required)).digest())


def der_to_jose(der: bytes) -> bytes:
    """ECDSA DER (what the key store returns) → JWS r||s, 32 bytes each."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")


def encode_jws(
    header: Mapping[str, Any],
    payload: Mapping[str, Any],
    sign_der: Callable[[bytes], bytes],
) -> str:
    """JWS compact serialization; ``sign_der`` signs the ASCII signing input."""
    return encode_jws_with_header(b64url(canonical_json(header)), payload, sign_der)


def encode_jws_with_header(
    header_segment: str,
    payload: Mapping[str, Any],
    sign_der: Callable[[bytes], bytes],
) -> str:
    """:func:`encode_jws` with the header already encoded (``b64url(canonical_json(h))``).

    For callers whose header is constant per key, so it is encoded once.
    """
    return encode_jws_raw(header_segment, payload, lambda data: der_to_jose(sign_der(data)))


def encode_jws_raw(
    header_segment: str,
    payload: Mapping[str, Any],
    sign_raw: Callable[[bytes], bytes],
) -> str:
    """:func:`encode_jws_with_header` for a signer that returns r||s already.

    PKCS#11 returns ECDSA signatures as r||s, which is the JWS form: going
    through DER and back costs two big-integer conversions per token.
    """
    # The payload need not be canonical, only valid JSON the signature covers
    # as sent: orjson (sorted, UTF-8, ~6x faster than the stdlib encoder),
    # or the stdlib encoder for what orjson refuses (ints beyond 64 bits).
    try:
        body = orjson.dumps(payload, option=ORJSON_SORTED)
    except TypeError:
        body = canonical_json(payload)
    signing_input = header_segment + "." + b64url(body)
    signature = sign_raw(signing_input.encode("ascii"))
    if len(signature) != 2 * _P256_BYTES:
        raise ValueError(f"ES256 signature must be 64 bytes r||s, got {len(signature)}")
    return signing_input + "." + b64url(signature)


def public_key_from_jwk(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    """P-256 public key from a JWK (ValueError on anything else)."""
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise ValueError("not a P-256 JWK")
    x = int.from_bytes(b64url_decode(str(jwk["x"])), "big")
    y = int.from_bytes(b64url_decode(str(jwk["y"])), "big")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
