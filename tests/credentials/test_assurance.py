"""Assurance levels: computed from verified facts by the daemon, carried in
tokens, and enforced (and capped by what it can check) by the Verifier."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from badgeclient.verify import ClaimsError, Verifier, token_assurance
from badged.core import x509 as bx
from badged.core.jose import ec_public_jwk, encode_jws, jwk_thumbprint
from badged.core.tokens import ES256, JWK_AGENT_MEMBER, build_claims
from badged.core.tpm_evidence import tpm_name
from badged.enroll.assurance import ADVANCED, ENTERPRISE, FOUNDATION, AssuranceOracle
from badged.enroll.store import EnrollmentStore
from badged.keystore.memory import MemoryKeyStore
from badged.keystore.port import KeyHandle

TD = "example.org"
AUD = "https://api.example.com"
ISS = f"spiffe://{TD}/badged"


def _statement(evidence: str, ak_name: bytes = b"") -> bytes:
    doc: dict[str, Any] = {"v": 1, "backend": "x", "evidence": evidence}
    if ak_name:
        doc["ak_name"] = ak_name.hex()
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class Pki:
    def __init__(self, *, evidence: str = "token-statement", ak_name: bytes = b"",
                 agents: list[str] | None = None, days: int = 30) -> None:
        self.keys = MemoryKeyStore()
        self.ca, self.dev = self.keys.generate("ca"), self.keys.generate("dev")
        now = time.time()
        self.root = bx.root_certificate(self.ca, name="Root", now=now, days=365, serial=1)
        self.device = bx.device_certificate(
            ca_key=self.ca, ca_cert=self.root, device_public=self.dev.public_key(),
            device_id="d1", trust_domain=TD, now=now, days=days, serial=2,
            agents=agents if agents is not None else ["alice"],
            attestation=_statement(evidence, ak_name))


def _oracle(tmp: Path, pki: Pki | None, keystore: Any) -> AssuranceOracle:
    store = EnrollmentStore(tmp)
    if pki is not None:
        store.save_device_chain([pki.device, pki.root])
    return AssuranceOracle(store, keystore)


def test_levels_from_facts_pkcs11(tmp_path: Path) -> None:
    soft = MemoryKeyStore()
    assert _oracle(tmp_path / "none", None, soft).level("alice", time.time()) == FOUNDATION
    o = _oracle(tmp_path / "pk", Pki(), soft)
    assert o.level("alice", time.time()) == ENTERPRISE
    assert o.level("bob", time.time()) == FOUNDATION  # not in the device's enrollment
    assert o.level("alice", time.time() + 400 * 86400) == FOUNDATION  # chain expired
    # a statement claiming a TPM means nothing on a store without one
    tpm_claim = _oracle(tmp_path / "claim", Pki(evidence="tpm2-activated-ak",
                                                ak_name=b"\0\x0b" + b"\1" * 32), soft)
    assert tpm_claim.level("alice", time.time()) == ENTERPRISE


@pytest.mark.tpm
def test_levels_from_facts_tpm(tmp_path: Path, tpm_store: Any) -> None:
    ak = tpm_name(tpm_store.ak_public())
    good = _oracle(tmp_path / "good", Pki(evidence="tpm2-activated-ak", ak_name=ak), tpm_store)
    assert good.level("alice", time.time()) == ADVANCED
    other_ak = _oracle(tmp_path / "other", Pki(evidence="tpm2-activated-ak",
                                               ak_name=b"\0\x0b" + b"\2" * 32), tpm_store)
    assert other_ak.level("alice", time.time()) == ENTERPRISE
    unactivated = _oracle(tmp_path / "plain", Pki(), tpm_store)
    assert unactivated.level("alice", time.time()) == ENTERPRISE


def _kid(key: KeyHandle) -> str:
    return jwk_thumbprint(ec_public_jwk(key.public_key()))


def _token(key: KeyHandle, assurance: str | None, *, x5c: list[x509.Certificate] | None = None,
           jti: str = "j") -> str:
    extra = {"assurance": assurance} if assurance is not None else None
    claims = build_claims(issuer=ISS, subject=f"spiffe://{TD}/agent/alice", audience=AUD,
                          scopes=(), ttl_seconds=120, now=time.time(), jti=jti, extra=extra)
    header: dict[str, Any] = {"alg": "ES256", "typ": "JWT", "kid": _kid(key)}
    if x5c:
        header["x5c"] = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                         for c in x5c]
    return encode_jws(header, claims, lambda d: key.sign(d, ES256))


def test_verifier_enforces_min_assurance() -> None:
    keys = MemoryKeyStore()
    agent = keys.generate("agent")
    jwks = {"keys": [{**ec_public_jwk(agent.public_key()), "kid": _kid(agent),
                      JWK_AGENT_MEMBER: f"spiffe://{TD}/agent/alice"}]}

    def verify(token: str, level: str | None) -> str:
        return Verifier(jwks=jwks, issuer=ISS, min_assurance=level).verify_token(
            token, audience=AUD).assurance

    assert verify(_token(agent, "advanced", jti="1"), "advanced") == "advanced"
    assert verify(_token(agent, "enterprise", jti="2"), "enterprise") == "enterprise"
    for claim, jti in (("enterprise", "3"), ("foundation", "4"), (None, "5"), ("platinum", "6")):
        with pytest.raises(ClaimsError) as info:
            verify(_token(agent, claim, jti=jti), "advanced")
        assert info.value.reason == "assurance_too_low", claim
    with pytest.raises(ValueError):
        Verifier(jwks=jwks, issuer=ISS, min_assurance="gold")


def test_chain_caps_the_claim() -> None:
    """Through x5c the relying party checks the facts itself: a device certificate
    without the CA's TPM statement caps any claim at enterprise."""
    plain = Pki()
    leaf = bx.agent_certificate(device_key=plain.dev, device_cert=plain.device, now=time.time(),
                                request=bx.AgentCertRequest(f"spiffe://{TD}/agent/alice",
                                                            "alice", plain.dev.public_key(),
                                                            7, 600))
    claims = {"assurance": "advanced"}
    assert token_assurance(claims, [leaf, plain.device]) == "enterprise"
    tpm = Pki(evidence="tpm2-activated-ak", ak_name=b"\0\x0b" + b"\3" * 32)
    assert token_assurance(claims, [leaf, tpm.device]) == "advanced"
    assert token_assurance({"assurance": "foundation"}, [leaf, tpm.device]) == "foundation"
    assert token_assurance({}, []) == "foundation"
