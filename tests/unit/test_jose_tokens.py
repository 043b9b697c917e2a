"""Token minting and JOSE encoding, checked against RFCs and an independent library."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jwt
from joserfc.jwk import ECKey

from badged.core.clock import FixedClock
from badged.core.jose import b64url_decode, ec_public_jwk, jwk_thumbprint
from badged.core.signing import SIGN_PREFIX, signed_message
from badged.core.tokens import build_claims, mint_token
from badged.errors import InvalidRequestError
from badged.keystore.memory import MemoryKeyStore


def test_rfc7638_thumbprint_matches_joserfc() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwk = ec_public_jwk(key)
    theirs = ECKey.import_key({**jwk}).thumbprint()
    assert jwk_thumbprint(jwk) == theirs


@pytest.mark.parametrize(
    ("case", "ttl", "scopes", "expect_scope"),
    [
        ("default 5 minutes", 300, (), None),
        ("one scope", 60, ("read",), "read"),
        ("scopes space-joined in order", 60, ("write", "read"), "write read"),
    ],
)
def test_claims_table(case: str, ttl: int, scopes: tuple[str, ...], expect_scope: str | None) -> None:
    clock = FixedClock(1_700_000_000.7)
    claims = build_claims(issuer="spiffe://td/badged", subject="spiffe://td/agent/a",
                          audience="aud", scopes=scopes, ttl_seconds=ttl, now=clock(), jti="j1")
    assert claims["iat"] == claims["nbf"] == 1_700_000_000, case
    assert claims["exp"] - claims["iat"] == ttl
    assert claims.get("scope") == expect_scope
    assert claims["aud"] == "aud" and claims["jti"] == "j1"


@pytest.mark.parametrize("ttl", [0, -5])
def test_nonpositive_ttl_rejected(ttl: int) -> None:
    with pytest.raises(ValueError):
        build_claims(issuer="i", subject="s", audience="a", scopes=(), ttl_seconds=ttl,
                     now=0, jti="j")


def test_extra_claims_cannot_override_registered_claims() -> None:
    with pytest.raises(ValueError):
        build_claims(issuer="i", subject="s", audience="a", scopes=(), ttl_seconds=5,
                     now=0, jti="j", extra={"exp": 10**10})


def test_minted_token_verifies_with_joserfc() -> None:
    store = MemoryKeyStore()
    key = store.generate("k")
    jwk = ec_public_jwk(key.public_key())
    kid = jwk_thumbprint(jwk)
    claims = build_claims(issuer="i", subject="spiffe://td/agent/a", audience="aud",
                          scopes=("read",), ttl_seconds=60, now=1_000, jti="abc")
    issued = mint_token(claims=claims, key=key, key_id=kid)
    header = json.loads(b64url_decode(issued.token.split(".")[0]))
    assert header == {"alg": "ES256", "kid": kid, "typ": "JWT"}
    decoded = jwt.decode(issued.token, ECKey.import_key({**jwk}), algorithms=["ES256"])
    assert decoded.claims["sub"] == "spiffe://td/agent/a"
    assert decoded.claims["jti"] == "abc"


class _RawOnlyKey:
    """A key whose backend returns r||s: ``sign`` must not be used for tokens."""

    def __init__(self, length: int = 64) -> None:
        self._key = MemoryKeyStore().generate("raw")
        self.length = length
        self.raw_calls = 0

    @property
    def name(self) -> str:
        return "raw"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        raise AssertionError("the DER path was taken although sign_raw exists")

    def sign_raw(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        self.raw_calls += 1
        r, s = decode_dss_signature(self._key.sign(data, signature_algorithm))
        return (r.to_bytes(32, "big") + s.to_bytes(32, "big"))[:self.length]


def test_raw_signer_path_verifies_with_joserfc() -> None:
    key = _RawOnlyKey()
    jwk = ec_public_jwk(key.public_key())
    claims = build_claims(issuer="i", subject="spiffe://td/agent/a", audience="aud",
                          scopes=("read",), ttl_seconds=60, now=1_000, jti="raw")
    issued = mint_token(claims=claims, key=key, key_id=jwk_thumbprint(jwk))
    assert key.raw_calls == 1
    decoded = jwt.decode(issued.token, ECKey.import_key({**jwk}), algorithms=["ES256"])
    assert decoded.claims["jti"] == "raw"


def test_raw_signer_of_the_wrong_length_is_refused() -> None:
    claims = build_claims(issuer="i", subject="s", audience="aud", scopes=(), ttl_seconds=60,
                          now=1_000, jti="x")
    with pytest.raises(ValueError, match="64 bytes"):
        mint_token(claims=claims, key=_RawOnlyKey(length=63), key_id="k")


def test_payload_orjson_refuses_is_still_encoded() -> None:
    """Ints beyond 64 bits (orjson refuses them) fall back to the stdlib encoder."""
    key = MemoryKeyStore().generate("big")
    jwk = ec_public_jwk(key.public_key())
    claims = build_claims(issuer="i", subject="s", audience="aud", scopes=(), ttl_seconds=60,
                          now=1_000, jti="big", extra={"n": 2**70, "name": "caf\u00e9"})
    issued = mint_token(claims=claims, key=key, key_id=jwk_thumbprint(jwk))
    decoded = jwt.decode(issued.token, ECKey.import_key({**jwk}), algorithms=["ES256"])
    assert decoded.claims["n"] == 2**70 and decoded.claims["name"] == "caf\u00e9"


def test_tampered_token_fails_joserfc() -> None:
    store = MemoryKeyStore()
    key = store.generate("k")
    jwk = ec_public_jwk(key.public_key())
    claims = build_claims(issuer="i", subject="s", audience="aud", scopes=(), ttl_seconds=60,
                          now=1_000, jti="abc")
    token = mint_token(claims=claims, key=key, key_id="x").token
    head, _payload, sig = token.split(".")
    forged_claims = dict(claims, aud="other")
    import base64

    forged_payload = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).rstrip(b"=")
    forged = f"{head}.{forged_payload.decode()}.{sig}"
    from joserfc.errors import BadSignatureError

    with pytest.raises(BadSignatureError):
        jwt.decode(forged, ECKey.import_key({**jwk}), algorithms=["ES256"])


def test_signed_message_is_domain_separated() -> None:
    msg = signed_message("git", b"data")
    assert msg == SIGN_PREFIX + b"git\x00data"
    # A JWS signing input is base64url text: it can never start with the prefix.
    assert b"\x00" in SIGN_PREFIX


@pytest.mark.parametrize("context", ["has space", "x" * 65, "nul\x00", "é"])
def test_bad_sign_context_rejected(context: str) -> None:
    with pytest.raises(InvalidRequestError):
        signed_message(context, b"")


def test_oversized_sign_data_rejected() -> None:
    with pytest.raises(InvalidRequestError):
        signed_message("", b"x" * (64 * 1024 + 1))


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda t: t.replace(t.split(".")[0], "eyJhbGciOiJub25lIn0"), "ES256"),
    (lambda t: t.rsplit(".", 1)[0] + ".AAAA", "signature"),
    (lambda t: "x" * 20000, "too large"),
    (lambda t: "a.b", "compact"),
])
def test_jws_verify_refusals(mutate: object, reason: str) -> None:
    from badged.core.jws_verify import verify_es256

    store = MemoryKeyStore()
    key = store.generate("k")
    claims = build_claims(issuer="i", subject="spiffe://td/agent/a", audience=["a1", "a2"],
                          scopes=(), ttl_seconds=60, now=1_000, jti="j")
    token = mint_token(claims=claims, key=key, key_id="kid1").token
    keys = {"kid1": key.public_key()}
    assert verify_es256(token, keys=keys, audience="a2", now=1_010)["aud"] == ["a1", "a2"]
    with pytest.raises(InvalidRequestError, match="audience"):
        verify_es256(token, keys=keys, audience="a3", now=1_010)
    with pytest.raises(InvalidRequestError, match="expired"):
        verify_es256(token, keys=keys, audience="a1", now=2_000)
    with pytest.raises(InvalidRequestError, match="unknown key"):
        verify_es256(token, keys={"other": key.public_key()}, audience="a1", now=1_010)
    with pytest.raises(InvalidRequestError, match=reason):
        verify_es256(mutate(token), keys=keys, audience="a1", now=1_010)  # type: ignore[operator]
