"""badgeclient.verify: every refusal has a specific reason (tables), and the
happy paths agree with what the daemon's core mints.

Keys are software keys (MemoryKeyStore) here: this is the relying party's
side, which never sees a token. The e2e tests run the same verifier on
credentials from a real daemon and SoftHSM.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509

from badgeclient.verify import (
    AlgorithmError,
    ChainError,
    ClaimsError,
    DpopError,
    DpopRequest,
    MalformedError,
    ReplayCache,
    ReplayError,
    Revocations,
    RevokedError,
    SignatureError,
    UntrustedKeyError,
    VerificationError,
    Verifier,
)
from badged.core import assertions, dpop
from badged.core import x509 as bx
from badged.core.clock import FixedClock
from badged.core.jose import (
    b64url,
    canonical_json,
    der_to_jose,
    ec_public_jwk,
    encode_jws,
    jwk_thumbprint,
)
from badged.core.tokens import ES256, build_claims, mint_token
from badged.keystore.memory import MemoryKeyStore
from badged.keystore.port import KeyHandle

NOW = 1_800_000_000
AGENT = "spiffe://example.org/agent/a"
AUD = "https://api.example.com"
ISSUER = "spiffe://example.org/badged"


class Env:
    def __init__(self) -> None:
        self.keys = MemoryKeyStore()
        self.agent = self.keys.generate("agent")
        self.other = self.keys.generate("other")
        self.kid = jwk_thumbprint(ec_public_jwk(self.agent.public_key()))
        # As badgectl jwks writes it: the issuer, and each key naming its agent.
        self.jwks = {"keys": [{**ec_public_jwk(self.agent.public_key()), "kid": self.kid,
                               "badged_agent": AGENT}],
                     "badged_issuer": ISSUER}
        self.clock = FixedClock(NOW)

    def verifier(self, **kw: Any) -> Verifier:
        return Verifier(jwks=self.jwks, clock=self.clock, **kw)

    def token(self, *, key: KeyHandle | None = None, kid: str | None = None, ttl: int = 300,
              now: float = NOW, extra: dict[str, Any] | None = None, jti: str = "j1") -> str:
        claims = build_claims(issuer=ISSUER, subject=AGENT, audience=AUD,
                              scopes=("read",), ttl_seconds=ttl, now=now, jti=jti, extra=extra)
        return mint_token(claims=claims, key=key or self.agent, key_id=kid or self.kid).token


def raw_jws(header: dict[str, Any], claims: dict[str, Any], key: KeyHandle) -> str:
    return encode_jws(header, claims, lambda d: key.sign(d, ES256))


@pytest.fixture
def env() -> Env:
    return Env()


def test_good_token_gives_typed_result(env: Env) -> None:
    r = env.verifier().verify_token(env.token(), audience=AUD,
                                    issuer="spiffe://example.org/badged")
    assert r.agent == AGENT and r.user is None and r.scopes == ("read",) and r.key_id == env.kid
    assert r.expires_at == NOW + 300 and "eyJ" not in repr(r)


def test_delegated_token_names_user_and_agent(env: Env) -> None:
    claims = {"iss": ISSUER, "sub": "spiffe://example.org/user/alice", "aud": AUD, "iat": NOW,
              "exp": NOW + 60, "jti": "d", "act": {"sub": AGENT}}
    r = env.verifier().verify_token(raw_jws({"alg": "ES256", "kid": env.kid, "typ": "JWT"},
                                            claims, env.agent), audience=AUD)
    assert r.agent == AGENT and r.user == "spiffe://example.org/user/alice"


def _swap_header(token: str, header: dict[str, Any]) -> str:
    _, p, s = token.split(".")
    return b64url(canonical_json(header)) + "." + p + "." + s


def _hs256(env: Env) -> str:
    """Alg confusion: HMAC keyed with the public key's JWK bytes."""
    import hashlib
    import hmac

    h = b64url(canonical_json({"alg": "HS256", "kid": env.kid, "typ": "JWT"}))
    p = env.token().split(".")[1]
    mac = hmac.new(json.dumps(env.jwks["keys"][0]).encode(), f"{h}.{p}".encode(), hashlib.sha256)
    return f"{h}.{p}.{b64url(mac.digest())}"


MUTATIONS: list[tuple[str, Callable[[Env], str], type[VerificationError], str]] = [
    ("alg none, empty signature", lambda e: _unsigned(e), AlgorithmError, "alg_none"),
    ("alg None spelled oddly", lambda e: _swap_header(e.token(), {"alg": "NoNe", "kid": e.kid,
                                                                  "typ": "JWT"}),
     AlgorithmError, "alg_none"),
    ("alg confusion HS256", _hs256, AlgorithmError, "alg_not_allowed"),
    ("ES384 header", lambda e: _swap_header(e.token(), {"alg": "ES384", "kid": e.kid, "typ": "JWT"}),
     AlgorithmError, "alg_not_allowed"),
    ("crit header", lambda e: raw_jws({"alg": "ES256", "kid": e.kid, "typ": "JWT", "crit": ["x"]},
                                      {"sub": AGENT}, e.agent), AlgorithmError, "header_not_allowed"),
    ("jku header", lambda e: raw_jws({"alg": "ES256", "kid": e.kid, "typ": "JWT",
                                      "jku": "https://evil/jwks"}, {"sub": AGENT}, e.agent),
     AlgorithmError, "header_not_allowed"),
    ("embedded jwk as trust anchor", lambda e: raw_jws(
        {"alg": "ES256", "typ": "JWT", "jwk": ec_public_jwk(e.other.public_key())},
        {"sub": AGENT, "aud": AUD, "exp": NOW + 60, "jti": "x"}, e.other),
     AlgorithmError, "header_not_allowed"),
    ("dpop typ used as token", lambda e: dpop.mint_proof(dpop.proof_claims(
        htm="GET", htu=AUD, now=NOW, jti="x"), e.agent), AlgorithmError, "wrong_typ"),
    ("oversized", lambda e: e.token(extra={"pad": "x" * 20000}), MalformedError, "oversized"),
    ("two parts", lambda e: ".".join(e.token().split(".")[:2]), MalformedError, "bad_structure"),
    ("bad base64 char", lambda e: e.token().replace(".", ".*", 1), MalformedError, "bad_base64"),
    ("padding", lambda e: e.token() + "=", MalformedError, "bad_base64"),
    ("non-canonical base64", lambda e: _noncanonical(e.token()), MalformedError, "bad_base64"),
    ("header not json", lambda e: b64url(b"{nope") + "." + e.token().split(".", 1)[1],
     MalformedError, "bad_json"),
    ("duplicate claim", lambda e: _dup_claims(e), MalformedError, "bad_json"),
    ("payload is a list", lambda e: e.token().split(".")[0] + "." + b64url(b"[1]") + "."
     + e.token().split(".")[2], MalformedError, "bad_json"),
    ("unknown kid", lambda e: e.token(kid="nope"), UntrustedKeyError, "unknown_kid"),
    ("other key same kid", lambda e: e.token(key=e.other), SignatureError, "bad_signature"),
    ("tampered claims", lambda e: _tamper(e.token()), SignatureError, "bad_signature"),
    ("short signature", lambda e: e.token().rsplit(".", 1)[0] + "." + b64url(b"\x01" * 10),
     SignatureError, "bad_signature"),
    ("expired", lambda e: e.token(now=NOW - 400), ClaimsError, "expired"),
    ("not yet valid (skewed issuer clock)", lambda e: e.token(now=NOW + 120), ClaimsError,
     "not_yet_valid"),
    ("lifetime too long", lambda e: e.token(ttl=2 * 86400), ClaimsError, "lifetime_too_long"),
    ("no exp", lambda e: raw_jws({"alg": "ES256", "kid": e.kid, "typ": "JWT"},
                                 {"sub": AGENT, "aud": AUD, "jti": "x"}, e.agent),
     ClaimsError, "missing_claim"),
    ("bool exp", lambda e: raw_jws({"alg": "ES256", "kid": e.kid, "typ": "JWT"},
                                   {"sub": AGENT, "aud": AUD, "jti": "x", "exp": True}, e.agent),
     ClaimsError, "bad_claim"),
    ("wrong audience", lambda e: _aud(e, "https://other.example"), ClaimsError, "wrong_audience"),
    ("sub not SPIFFE", lambda e: raw_jws({"alg": "ES256", "kid": e.kid, "typ": "JWT"},
                                         {"iss": ISSUER, "sub": "root", "aud": AUD, "exp": NOW + 9,
                                          "jti": "x"}, e.agent), ClaimsError, "bad_subject"),
]


def _unsigned(e: Env) -> str:
    h, p, _ = _swap_header(e.token(), {"alg": "none", "kid": e.kid, "typ": "JWT"}).split(".")
    return f"{h}.{p}."


def _noncanonical(token: str) -> str:
    h, p, s = token.split(".")
    # flip unused low bits of the last char of the signature: same bytes, other text
    last = s[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    idx = alphabet.index(last)
    return f"{h}.{p}.{s[:-1]}{alphabet[idx ^ 1]}"


def _tamper(token: str) -> str:
    h, p, s = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=="))
    claims["scope"] = "admin"
    return f"{h}.{b64url(canonical_json(claims))}.{s}"


def _dup_claims(e: Env) -> str:
    h = b64url(canonical_json({"alg": "ES256", "kid": e.kid, "typ": "JWT"}))
    p = b64url(b'{"sub":"a","sub":"b"}')
    sig = b64url(b"\x00" * 64)
    return f"{h}.{p}.{sig}"


def _aud(e: Env, aud: str) -> str:
    claims = build_claims(issuer=ISSUER, subject=AGENT, audience=aud, scopes=(), ttl_seconds=60,
                          now=NOW, jti="x")
    return mint_token(claims=claims, key=e.agent, key_id=e.kid).token


@pytest.mark.parametrize(("case", "make", "exc", "reason"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_token_refusals(env: Env, case: str, make: Callable[[Env], str],
                        exc: type[VerificationError], reason: str) -> None:
    with pytest.raises(exc) as info:
        env.verifier().verify_token(make(env), audience=AUD)
    assert info.value.reason == reason, case


@pytest.mark.parametrize(("case", "offset", "skew", "ok"), [
    ("just expired inside skew", 300 + 29, 30, True),
    ("expired beyond skew", 300 + 31, 30, False),
    ("zero skew, one second late", 301, 0, False),
    ("issuer 20s ahead, skew 30", -20, 30, True),
    ("issuer 40s ahead, skew 30", -40, 30, False),
])
def test_skew_table(env: Env, case: str, offset: int, skew: int, ok: bool) -> None:
    token = env.token()
    env.clock.now = NOW + offset
    v = env.verifier(skew=skew)
    if ok:
        v.verify_token(token, audience=AUD)
    else:
        with pytest.raises(ClaimsError):
            v.verify_token(token, audience=AUD)


def test_skew_is_bounded() -> None:
    with pytest.raises(ValueError):
        Verifier(jwks={"keys": []}, skew=3600)


def test_replay_is_refused_and_forgotten_after_expiry(env: Env) -> None:
    v = env.verifier()
    tok = env.token()
    v.verify_token(tok, audience=AUD)
    with pytest.raises(ReplayError) as info:
        v.verify_token(tok, audience=AUD)
    assert info.value.reason == "replayed"
    cache = ReplayCache(max_entries=2)
    cache.check_and_add("a", until=10, now=0)
    cache.check_and_add("b", until=10, now=0)
    with pytest.raises(ReplayError) as full:
        cache.check_and_add("c", until=10, now=5)
    assert full.value.reason == "replay_cache_full"
    cache.check_and_add("c", until=30, now=11)  # a, b expired: purged, c accepted
    assert len(cache) == 1


@pytest.mark.parametrize("field", ["spiffe_ids", "key_ids"])
def test_revoked_agent_or_key_refused(env: Env, field: str) -> None:
    value = AGENT if field == "spiffe_ids" else env.kid
    revoked = frozenset({value})
    v = env.verifier(revocations=Revocations(spiffe_ids=revoked) if field == "spiffe_ids"
                     else Revocations(key_ids=revoked))
    with pytest.raises(RevokedError) as info:
        v.verify_token(env.token(), audience=AUD)
    assert info.value.reason == "revoked"


# -- DPoP ------------------------------------------------------------------------

HTU = "https://rs.example.com/orders"


def _proof(e: Env, *, key: KeyHandle | None = None, htm: str = "GET", htu: str = HTU,
           now: float = NOW, jti: str = "p1", token: str | None = None,
           nonce: str | None = None) -> str:
    return dpop.mint_proof(dpop.proof_claims(htm=htm, htu=htu, now=now, jti=jti,
                                             access_token=token, nonce=nonce), key or e.agent)


def test_dpop_bound_token_accepted_with_matching_proof(env: Env) -> None:
    token = env.token(extra={"cnf": {"jkt": env.kid}})
    proof = _proof(env, token=token, htu=HTU + "?page=2")
    r = env.verifier().verify_token(token, audience=AUD, dpop=DpopRequest(proof, "GET", HTU))
    assert r.dpop_jkt == env.kid


DPOP_CASES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("wrong htm", {"htm": "POST"}, {}, "htm_mismatch"),
    ("wrong htu", {"htu": "https://rs.example.com/admin"}, {}, "htu_mismatch"),
    ("other host", {"htu": "https://evil.example.com/orders"}, {}, "htu_mismatch"),
    ("stale proof", {"now": NOW - 200}, {}, "iat_window"),
    ("proof from the future", {"now": NOW + 120}, {}, "iat_window"),
    ("ath for another token", {"token": "other.token.value"}, {}, "ath_mismatch"),
    ("no ath", {"token": None}, {}, "ath_mismatch"),
    ("missing nonce", {}, {"nonce": "server-nonce"}, "nonce_mismatch"),
    ("other key", {"key": "other"}, {}, "jkt_mismatch"),
]


@pytest.mark.parametrize(("case", "proof_kw", "req_kw", "reason"), DPOP_CASES,
                         ids=[c[0] for c in DPOP_CASES])
def test_dpop_refusals(env: Env, case: str, proof_kw: dict[str, Any], req_kw: dict[str, Any],
                       reason: str) -> None:
    token = env.token(extra={"cnf": {"jkt": env.kid}})
    kw: dict[str, Any] = {"token": token, **proof_kw}
    if kw.get("key") == "other":
        kw["key"] = env.other
    proof = _proof(env, **kw)
    with pytest.raises(DpopError) as info:
        env.verifier().verify_token(token, audience=AUD, dpop=DpopRequest(
            proof, "GET", HTU, nonce=req_kw.get("nonce")))
    assert info.value.reason == reason, case


def test_dpop_bound_token_without_proof_and_proof_replay(env: Env) -> None:
    token = env.token(extra={"cnf": {"jkt": env.kid}})
    v = env.verifier()
    with pytest.raises(DpopError) as info:
        v.verify_token(token, audience=AUD)
    assert info.value.reason == "missing_proof"
    with pytest.raises(DpopError) as unbound:
        v.verify_token(env.token(jti="j9"), audience=AUD, require_dpop=True)
    assert unbound.value.reason == "token_not_bound"
    proof = _proof(env)
    v.verify_dpop(proof, htm="GET", htu=HTU)
    with pytest.raises(ReplayError):
        v.verify_dpop(proof, htm="GET", htu=HTU)


@pytest.mark.parametrize(("case", "header", "reason"), [
    ("private key in jwk", {"d": "AAAA"}, "bad_jwk"),
    ("RSA jwk", {"kty": "RSA"}, "bad_jwk"),
    ("no jwk", None, "bad_jwk"),
])
def test_dpop_jwk_header_rules(env: Env, case: str, header: dict[str, str] | None,
                               reason: str) -> None:
    jwk = None if header is None else {**ec_public_jwk(env.agent.public_key()), **header}
    h: dict[str, Any] = {"typ": "dpop+jwt", "alg": "ES256"}
    if jwk is not None:
        h["jwk"] = jwk
    proof = raw_jws(h, {"htm": "GET", "htu": HTU, "iat": NOW, "jti": "z"}, env.agent)
    with pytest.raises(UntrustedKeyError) as info:
        env.verifier().verify_dpop(proof, htm="GET", htu=HTU)
    assert info.value.reason == reason, case


# -- client assertions and attestations -------------------------------------------------


def test_client_assertion_rules(env: Env) -> None:
    def mk(**kw: Any) -> str:
        args = {"client_id": "client-1", "audience": "https://as/token", "now": NOW,
                "ttl_seconds": 60, "jti": "a1", **kw}
        return assertions.mint_client_assertion(assertions.client_assertion_claims(**args),
                                                env.agent, env.kid)
    v = env.verifier()
    r = v.verify_client_assertion(mk(), audience="https://as/token", client_id="client-1")
    # The agent is the one the signing key belongs to, whatever the client id.
    assert r.agent == AGENT and r.claims["sub"] == "client-1" and r.jti == "a1"
    with pytest.raises(ReplayError):
        v.verify_client_assertion(mk(), audience="https://as/token")
    with pytest.raises(ClaimsError) as aud:
        v.verify_client_assertion(mk(jti="a2"), audience="https://other/token")
    assert aud.value.reason == "wrong_audience"
    with pytest.raises(ClaimsError) as cid:
        v.verify_client_assertion(mk(jti="a3"), audience="https://as/token", client_id="client-2")
    assert cid.value.reason == "wrong_subject"
    mixed = raw_jws({"alg": "ES256", "kid": env.kid, "typ": assertions.ASSERTION_TYP},
                    {"iss": "a", "sub": "b",
                                                       "aud": "https://as/token",
                                                       "exp": NOW + 30, "jti": "m"}, env.agent)
    with pytest.raises(ClaimsError) as mix:
        v.verify_client_assertion(mixed, audience="https://as/token")
    assert mix.value.reason == "iss_sub_mismatch"


class Pki:
    def __init__(self, env: Env, *, now: int = NOW) -> None:
        k = env.keys
        self.ca, self.dev = k.generate("ca"), k.generate("dev")
        self.root = bx.root_certificate(self.ca, name="Root", now=now, days=365, serial=1)
        self.device = bx.device_certificate(
            ca_key=self.ca, ca_cert=self.root, device_public=self.dev.public_key(), device_id="d1",
            trust_domain="example.org", now=now, days=30, serial=2)
        self.leaf = bx.agent_certificate(device_key=self.dev, device_cert=self.device, now=now,
                                         request=bx.AgentCertRequest(AGENT, "a",
                                                                     env.agent.public_key(), 77, 600))

    def x5c(self, *certs: x509.Certificate) -> list[str]:
        from cryptography.hazmat.primitives import serialization
        return [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                for c in certs]


def _x5c_token(env: Env, pki: Pki, *, sub: str = AGENT, jti: str = "x1") -> str:
    claims = build_claims(issuer=ISSUER, subject=sub, audience=AUD, scopes=(), ttl_seconds=120,
                          now=NOW, jti=jti)
    return raw_jws({"alg": "ES256", "typ": "JWT", "x5c": pki.x5c(pki.leaf, pki.device)}, claims,
                   env.agent)


def test_x5c_chain_to_root(env: Env) -> None:
    pki = Pki(env)
    v = Verifier(roots=[pki.root], clock=env.clock, issuer=ISSUER)
    r = v.verify_token(_x5c_token(env, pki), audience=AUD)
    assert r.agent == AGENT and len(r.chain) == 2


@pytest.mark.parametrize(("case", "mutate", "exc", "reason"), [
    ("sub is another agent", lambda e, p, v: _x5c_token(e, p, sub="spiffe://example.org/agent/b"),
     ChainError, "san_mismatch"),
    ("untrusted root", "other_root", ChainError, "chain_untrusted"),
    ("expired chain", "late", ChainError, "chain_expired"),
    ("not yet valid chain", "early", ChainError, "chain_not_yet_valid"),
    ("revoked serial", "revoked", RevokedError, "revoked"),
    ("garbage x5c", lambda e, p, v: raw_jws({"alg": "ES256", "typ": "JWT", "x5c": ["%%%"]},
                                            {"sub": AGENT}, e.agent), MalformedError, "bad_base64"),
    ("chain too long", lambda e, p, v: raw_jws({"alg": "ES256", "typ": "JWT",
                                                "x5c": p.x5c(p.leaf) * 5}, {"sub": AGENT}, e.agent),
     ChainError, "bad_chain"),
])
def test_x5c_refusals(env: Env, case: str, mutate: Any, exc: type[VerificationError],
                      reason: str) -> None:
    pki = Pki(env)
    roots = [pki.root]
    revocations = None
    token = _x5c_token(env, pki)
    if mutate == "other_root":
        other = env.keys.generate("ca2")
        roots = [bx.root_certificate(other, name="Root", now=NOW, days=365, serial=1)]
    elif mutate == "late":
        env.clock.now = NOW + 601
    elif mutate == "early":
        env.clock.now = NOW - 3600
    elif mutate == "revoked":
        crl = bx.agent_crl(device_key=pki.dev, device_cert=pki.device, now=NOW,
                           next_update_seconds=600, number=1,
                           revoked=[bx.RevokedSerial(77, NOW, x509.ReasonFlags.cessation_of_operation)])
        revocations = Revocations.from_crl(bx.to_pem(crl).encode(), pki.device, now=NOW)
    elif callable(mutate):
        token = mutate(env, pki, None)
    v = Verifier(roots=roots, clock=env.clock, issuer=ISSUER, revocations=revocations)
    with pytest.raises(exc) as info:
        v.verify_token(token, audience=AUD)
    assert info.value.reason == reason, case


def test_crl_must_be_signed_by_issuer_and_current(env: Env) -> None:
    pki = Pki(env)
    crl = bx.agent_crl(device_key=env.other, device_cert=pki.device, now=NOW,
                       next_update_seconds=600, number=1, revoked=[])
    with pytest.raises(SignatureError):
        Revocations.from_crl(bx.to_pem(crl).encode(), pki.device, now=NOW)
    good = bx.agent_crl(device_key=pki.dev, device_cert=pki.device, now=NOW,
                        next_update_seconds=600, number=1, revoked=[])
    with pytest.raises(ChainError) as stale:
        Revocations.from_crl(bx.to_pem(good).encode(), pki.device, now=NOW + 700)
    assert stale.value.reason == "stale_crl"


def test_client_attestation_via_device_chain(env: Env) -> None:
    pki = Pki(env)
    ev = {"eat_profile": "urn:badged:eat:pkcs11-key:v1", "agent": AGENT,
          "hwkey": {"sensitive": True, "never_extractable": True}, "workload": {"uid": 1}}
    dev_id = jwk_thumbprint(ec_public_jwk(pki.dev.public_key()))
    att = assertions.mint_client_attestation(assertions.client_attestation_claims(
        attester=f"spiffe://example.org/device/{dev_id}", client_id="client-1",
        agent_key=env.agent.public_key(), now=NOW, ttl_seconds=600, evidence=ev),
        pki.dev, x5c=pki.x5c(pki.device))

    def pop(jti: str, key: KeyHandle | None = None, challenge: str | None = "c") -> str:
        return assertions.mint_attestation_pop(assertions.attestation_pop_claims(
            client_id="client-1", audience="https://as", now=NOW, ttl_seconds=60, jti=jti,
            challenge=challenge), key or env.agent)

    v = Verifier(roots=[pki.root], clock=env.clock, issuer=ISSUER)
    r = v.verify_client_attestation(att, pop("p1"), audience="https://as", challenge="c")
    assert r.agent == AGENT and r.attestation is not None
    assert r.attestation.hwkey["never_extractable"] is True
    assert r.attestation.key_thumbprint == env.kid
    cases: list[tuple[str, str, type[VerificationError], str]] = [
        ("replayed pop", pop("p1"), ReplayError, "replayed"),
        ("pop by another key", pop("p2", key=env.other), SignatureError, "bad_signature"),
        ("missing challenge", pop("p3", challenge=None), ClaimsError, "challenge_mismatch"),
    ]
    for case, p, exc, reason in cases:
        with pytest.raises(exc) as info:
            v.verify_client_attestation(att, p, audience="https://as", challenge="c")
        assert info.value.reason == reason, case
    with pytest.raises(ChainError):
        Verifier(roots=[bx.root_certificate(env.other, name="R", now=NOW, days=1, serial=5)],
                 clock=env.clock).verify_client_attestation(att, pop("p4"), audience="https://as")


def test_agent_key_cannot_pose_as_attester(env: Env) -> None:
    """Even a relying party that puts agent keys and the device key in one JWKS
    cannot be fooled by an attestation an agent key signed about itself."""
    forged = assertions.mint_client_attestation(assertions.client_attestation_claims(
        attester="spiffe://example.org/device/some-device", client_id="c",
        agent_key=env.agent.public_key(), now=NOW, ttl_seconds=600,
        evidence={"hwkey": {"sensitive": True}}), env.agent)
    forged = _swap_header(forged, {"alg": "ES256", "typ": "oauth-client-attestation+jwt",
                                   "kid": env.kid})
    # re-sign with the new header so only the attester binding is wrong
    h, p, _ = forged.split(".")
    sig = der_to_jose(env.agent.sign(f"{h}.{p}".encode(), ES256))
    forged = f"{h}.{p}.{b64url(sig)}"
    pop = assertions.mint_attestation_pop(assertions.attestation_pop_claims(
        client_id="c", audience="https://as", now=NOW, ttl_seconds=60, jti="f"), env.agent)
    with pytest.raises(ClaimsError) as info:
        env.verifier().verify_client_attestation(forged, pop, audience="https://as")
    assert info.value.reason == "wrong_issuer"


def test_device_key_cannot_mint_agent_tokens_or_assertions(env: Env) -> None:
    """A CA certificate (the device's) is not an agent leaf: tokens it signs are refused."""
    pki = Pki(env)
    claims = build_claims(issuer=ISSUER, subject="spiffe://example.org/device/d1", audience=AUD,
                          scopes=(), ttl_seconds=60, now=NOW, jti="dv")
    token = raw_jws({"alg": "ES256", "typ": "JWT", "x5c": pki.x5c(pki.device)}, claims, pki.dev)
    with pytest.raises(ChainError) as info:
        Verifier(roots=[pki.root], clock=env.clock, issuer=ISSUER).verify_token(token, audience=AUD)
    assert info.value.reason == "chain_untrusted"


def test_assertion_sub_must_match_certificate_san(env: Env) -> None:
    pki = Pki(env)
    claims = assertions.client_assertion_claims(client_id="spiffe://example.org/agent/b",
                                                audience=AUD, now=NOW, ttl_seconds=60, jti="s1")
    a = raw_jws({"alg": "ES256", "typ": assertions.ASSERTION_TYP,
                 "x5c": pki.x5c(pki.leaf, pki.device)}, claims, env.agent)
    with pytest.raises(ChainError) as info:
        Verifier(roots=[pki.root], clock=env.clock, issuer=ISSUER).verify_client_assertion(a, audience=AUD)
    assert info.value.reason == "san_mismatch"


def test_attestation_for_another_trust_domain_or_by_revoked_device(env: Env) -> None:
    pki = Pki(env)
    dev_id = jwk_thumbprint(ec_public_jwk(pki.dev.public_key()))

    def attestation(agent: str) -> str:
        return assertions.mint_client_attestation(assertions.client_attestation_claims(
            attester=f"spiffe://example.org/device/{dev_id}", client_id="c",
            agent_key=env.agent.public_key(), now=NOW, ttl_seconds=600,
            evidence={"agent": agent}), pki.dev, x5c=pki.x5c(pki.device))

    def pop(jti: str) -> str:
        return assertions.mint_attestation_pop(assertions.attestation_pop_claims(
            client_id="c", audience="https://as", now=NOW, ttl_seconds=60, jti=jti), env.agent)

    v = Verifier(roots=[pki.root], clock=env.clock, issuer=ISSUER)
    with pytest.raises(ChainError) as td:
        v.verify_client_attestation(attestation("spiffe://other.org/agent/a"), pop("1"),
                                    audience="https://as")
    assert td.value.reason == "san_mismatch"
    revoked = Verifier(roots=[pki.root], clock=env.clock, issuer=ISSUER,
                       revocations=Revocations(serials=frozenset({pki.device.serial_number})))
    with pytest.raises(RevokedError):
        revoked.verify_client_attestation(attestation(AGENT), pop("2"), audience="https://as")
    assert v.verify_client_attestation(attestation(AGENT), pop("3"),
                                       audience="https://as").agent == AGENT
