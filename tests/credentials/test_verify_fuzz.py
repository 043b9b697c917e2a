"""Whatever a relying party is handed, the verifier answers with a
VerificationError (or a result) -- never another exception type that a
server would turn into a 500. Seeded, so a failure reproduces."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from badgeclient.verify import DpopRequest, VerificationError, Verifier
from badged.core import assertions, dpop
from badged.core.jose import b64url, canonical_json, ec_public_jwk, encode_jws, jwk_thumbprint
from badged.core.tokens import ES256
from badged.keystore.memory import MemoryKeyStore

NOW = 1_800_000_000
WEIRD: list[Any] = [None, True, 0, -1, 2**70, 1.5, "", "x" * 300, [], [1, "a"], {}, {"a": {}},
                    "spiffe://example.org/agent/a", "ES256", "none", ["ES256"], {"jkt": 5},
                    ["MIIB"], ["%%"], [{"a": 1}], {"sub": 3}, {"kty": "EC", "crv": "P-256"},
                    {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, float("nan"),
                    "https://[::1", "http://u:p@h:99999/x", "https://rs/x?q#f", "GET"]


def _sign(header: dict[str, Any], claims: dict[str, Any], key: Any) -> str:
    return encode_jws(header, claims, lambda d: key.sign(d, ES256))


@pytest.fixture(scope="module")
def material() -> dict[str, Any]:
    keys = MemoryKeyStore()
    agent = keys.generate("agent")
    kid = jwk_thumbprint(ec_public_jwk(agent.public_key()))
    jwks = {"keys": [{**ec_public_jwk(agent.public_key()), "kid": kid}]}
    header = {"alg": "ES256", "kid": kid, "typ": "JWT"}
    claims = {"iss": "i", "sub": "spiffe://example.org/agent/a", "aud": "A", "iat": NOW,
              "nbf": NOW, "exp": NOW + 60, "jti": "j", "cnf": {"jkt": kid}}
    from badged.core import x509 as bx

    root = bx.root_certificate(keys.generate("ca"), name="R", now=NOW, days=1, serial=1)
    return {"agent": agent, "kid": kid, "jwks": jwks, "header": header, "claims": claims,
            "root": root}


def _attempt(v: Verifier, token: str, proof: str) -> None:
    try:
        v.verify_token(token, audience="A", dpop=DpopRequest(proof, "GET", "https://rs/x"))
    except VerificationError:
        pass
    try:
        v.verify_client_assertion(token, audience="A")
    except VerificationError:
        pass
    try:
        v.verify_client_attestation(token, proof, audience="A")
    except VerificationError:
        pass
    try:
        v.verify_dpop(proof, htm="GET", htu="https://rs/x", access_token=token)
    except VerificationError:
        pass


def test_structured_mutations_only_raise_verification_errors(material: dict[str, Any]) -> None:
    rng = random.Random(20261124)
    agent = material["agent"]
    for _ in range(600):
        header = dict(material["header"])
        claims = json.loads(json.dumps(material["claims"]))
        target = rng.choice([header, claims])
        for _ in range(rng.randint(1, 3)):
            key = rng.choice([*target.keys(), "x5c", "jwk", "act", "typ", "crit"])
            target[key] = rng.choice(WEIRD)
        token = _sign(header, claims, agent)
        pclaims = dpop.proof_claims(htm="GET", htu="https://rs/x", now=NOW, jti=str(rng.random()))
        pheader = {"typ": "dpop+jwt", "alg": "ES256", "jwk": ec_public_jwk(agent.public_key())}
        ptarget = rng.choice([pheader, pclaims])
        ptarget[rng.choice([*ptarget.keys(), "ath", "nonce"])] = rng.choice(WEIRD)
        proof = _sign(pheader, pclaims, agent)
        for v in (Verifier(jwks=material["jwks"], clock=lambda: NOW),
                  Verifier(jwks=material["jwks"], roots=[material["root"]], clock=lambda: NOW)):
            _attempt(v, token, proof)


def test_byte_mutations_only_raise_verification_errors(material: dict[str, Any]) -> None:
    rng = random.Random(7)
    agent = material["agent"]
    good = _sign(material["header"], material["claims"], agent)
    att = assertions.mint_client_attestation(assertions.client_attestation_claims(
        attester="spiffe://example.org/device/d", client_id="c", agent_key=agent.public_key(),
        now=NOW, ttl_seconds=60, evidence={}), agent)
    alphabet = "ABCxyz019-_.=+/ \x00é{}\"[]"
    for _ in range(1500):
        base = rng.choice([good, att])
        chars = list(base)
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(3)
            i = rng.randrange(len(chars))
            if op == 0:
                chars[i] = rng.choice(alphabet)
            elif op == 1:
                del chars[i]
            else:
                chars.insert(i, rng.choice(alphabet))
        mutated = "".join(chars)
        _attempt(Verifier(jwks=material["jwks"], clock=lambda: NOW), mutated, mutated)
    # whole segments replaced by valid base64url of odd JSON
    for value in WEIRD:
        seg = b64url(canonical_json({"v": value}) if isinstance(value, dict) else
                     json.dumps(value).encode())
        h, p, s = good.split(".")
        for token in (f"{seg}.{p}.{s}", f"{h}.{seg}.{s}", f"{h}.{p}.{seg}"):
            _attempt(Verifier(jwks=material["jwks"], clock=lambda: NOW), token, token)
