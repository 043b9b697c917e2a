"""Pure credential logic: DPoP, assertions, evidence, X.509 -- tables, and
each artifact checked with an independent library (joserfc, openssl)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey

from badged.core import assertions, dpop, evidence
from badged.core import x509 as bx
from badged.core.jose import b64url, b64url_decode, ec_public_jwk, jwk_thumbprint
from badged.keystore.memory import MemoryKeyStore
from badged.keystore.port import KeyHandle, KeyProperties

NOW = 1_800_000_000


def _parts(token: str) -> tuple[dict[str, object], dict[str, object]]:
    h, p, _ = token.split(".")
    return json.loads(b64url_decode(h)), json.loads(b64url_decode(p))


@pytest.fixture
def keys() -> MemoryKeyStore:
    return MemoryKeyStore()


@pytest.mark.parametrize(("url", "expect"), [
    ("https://API.Example.com/path?q=1#frag", "https://api.example.com/path"),
    ("https://api.example.com:443/a", "https://api.example.com/a"),
    ("http://api.example.com:80", "http://api.example.com/"),
    ("https://api.example.com:8443/x/y", "https://api.example.com:8443/x/y"),
    ("HTTPS://[::1]:9000/r", "https://[::1]:9000/r"),
])
def test_htu_normalization(url: str, expect: str) -> None:
    assert dpop.normalize_htu(url) == expect


@pytest.mark.parametrize("url", [
    "ftp://example.com/", "/relative", "https://user:pw@example.com/", "https:///nohost",
    "https://example.com/" + "a" * 3000, "https://exa mple.com/", "https://example.com:99999/",
    "https://[::1/x",
])
def test_htu_refused(url: str) -> None:
    with pytest.raises(ValueError):
        dpop.normalize_htu(url)


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"htm": "GET POST"}, "htm"),
    ({"htm": ""}, "htm"),
    ({"nonce": "has space"}, "nonce"),
    ({"access_token": "é"}, "access token"),
])
def test_dpop_claims_refuse_bad_input(kwargs: dict[str, str], problem: str) -> None:
    args = {"htm": "GET", "htu": "https://rs.example/", "now": NOW, "jti": "j", **kwargs}
    with pytest.raises(ValueError, match=problem):
        dpop.proof_claims(**args)  # type: ignore[arg-type]


def test_dpop_proof_matches_rfc9449_and_joserfc(keys: MemoryKeyStore) -> None:
    key = keys.generate("agent")
    claims = dpop.proof_claims(htm="POST", htu="https://AS.example/token?x=1", now=NOW + 0.9,
                               jti="abc", access_token="tok.en.value", nonce="n-1")
    proof = dpop.mint_proof(claims, key)
    header, payload = _parts(proof)
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
    assert header["jwk"] == ec_public_jwk(key.public_key()) and "kid" not in header
    assert payload == {"htm": "POST", "htu": "https://as.example/token", "iat": NOW, "jti": "abc",
                       "ath": dpop.access_token_hash("tok.en.value"), "nonce": "n-1"}
    # independent: joserfc verifies with the embedded key; ath per RFC 9449 §4.2
    decoded = jwt.decode(proof, ECKey.import_key(header["jwk"]), algorithms=["ES256"])
    import base64
    import hashlib
    assert decoded.claims["ath"] == base64.urlsafe_b64encode(
        hashlib.sha256(b"tok.en.value").digest()).rstrip(b"=").decode()
    assert dpop.jkt(key.public_key()) == ECKey.import_key(header["jwk"]).thumbprint()


@pytest.mark.parametrize(("ttl", "ok"), [(1, True), (60, True), (300, True), (0, False),
                                         (301, False), (-1, False)])
def test_client_assertion_lifetime_is_seconds(ttl: int, ok: bool) -> None:
    if not ok:
        with pytest.raises(ValueError):
            assertions.client_assertion_claims(client_id="c", audience="a", now=NOW,
                                               ttl_seconds=ttl, jti="j")
        return
    c = assertions.client_assertion_claims(client_id="c", audience="https://as/token", now=NOW,
                                           ttl_seconds=ttl, jti="j")
    assert c == {"iss": "c", "sub": "c", "aud": "https://as/token", "iat": NOW, "nbf": NOW,
                 "exp": NOW + ttl, "jti": "j"}


def _props(**over: object) -> KeyProperties:
    base: dict[str, object] = {"backend": "pkcs11", "sensitive": True, "extractable": False,
                               "never_extractable": True, "local": True,
                               "extra": {"token": "pkcs11:token=t"}}
    base.update(over)
    return KeyProperties(**base)  # type: ignore[arg-type]


def _evidence(device: KeyHandle, attested: KeyHandle, *, props: KeyProperties | None = None,
              now: int = NOW) -> str:
    claims = evidence.build_evidence_claims(
        issuer="spiffe://td/device/d", subject="spiffe://td/agent/a",
        attested=attested.public_key(), props=props or _props(), now=now, ttl_seconds=600,
        nonce="n", workload={"uid": 1000})
    return evidence.sign_evidence(claims, device_key=device)


def test_attestation_and_pop_shapes(keys: MemoryKeyStore) -> None:
    device, agent = keys.generate("dev"), keys.generate("agent")
    ev_claims = evidence.build_evidence_claims(
        issuer="spiffe://td/device/d", subject="spiffe://td/agent/a", attested=agent.public_key(),
        props=_props(), now=NOW, ttl_seconds=600, workload={"uid": 1000})
    att = assertions.mint_client_attestation(assertions.client_attestation_claims(
        attester="spiffe://td/device/d", client_id="client-1", agent_key=agent.public_key(),
        now=NOW, ttl_seconds=3600, evidence=ev_claims), device, x5c=["AAAA"])
    h, c = _parts(att)
    assert h["typ"] == "oauth-client-attestation+jwt" and h["x5c"] == ["AAAA"]
    assert h["kid"] == jwk_thumbprint(ec_public_jwk(device.public_key()))
    assert c["sub"] == "client-1" and c["cnf"] == {"jwk": ec_public_jwk(agent.public_key())}
    assert c["hwkey"]["never_extractable"] is True and c["workload"] == {"uid": 1000}  # type: ignore[index]
    pop = assertions.mint_attestation_pop(assertions.attestation_pop_claims(
        client_id="client-1", audience="https://as", now=NOW, ttl_seconds=60, jti="p",
        challenge="ch"), agent)
    ph, pc = _parts(pop)
    assert ph == {"alg": "ES256", "typ": "oauth-client-attestation-pop+jwt"}
    assert pc["challenge"] == "ch" and pc["aud"] == "https://as"
    jwt.decode(pop, ECKey.import_key(c["cnf"]["jwk"]), algorithms=["ES256"])


@pytest.mark.parametrize(("case", "props", "reason"), [
    ("good", None, None),
    ("not sensitive", {"sensitive": False}, "not_sensitive"),
    ("extractable", {"extractable": True}, "extractable"),
    ("was extractable once", {"never_extractable": False}, "extractable"),
    ("imported", {"local": False}, "not_generated_in_token"),
])
def test_evidence_attribute_table(keys: MemoryKeyStore, case: str, props: dict[str, object] | None,
                                  reason: str | None) -> None:
    device, agent = keys.generate("dev"), keys.generate("agent")
    token = _evidence(device, agent, props=_props(**(props or {})))
    if reason is None:
        claims = evidence.check_evidence(token, signer=device.public_key(),
                                         attested=agent.public_key(), now=NOW)
        assert claims["eat_nonce"] == "n", case
        return
    with pytest.raises(evidence.EvidenceError) as info:
        evidence.check_evidence(token, signer=device.public_key(), attested=agent.public_key(),
                                now=NOW)
    assert info.value.reason == reason, case


def test_evidence_for_another_key_or_signer_or_time_is_refused(keys: MemoryKeyStore) -> None:
    device, agent, other = keys.generate("dev"), keys.generate("agent"), keys.generate("other")
    token = _evidence(device, agent)
    cases = [
        ({"signer": other.public_key(), "attested": agent.public_key(), "now": NOW}, "bad_signature"),
        ({"signer": device.public_key(), "attested": other.public_key(), "now": NOW}, "key_mismatch"),
        ({"signer": device.public_key(), "attested": agent.public_key(), "now": NOW + 3600},
         "expired"),
        ({"signer": device.public_key(), "attested": agent.public_key(), "now": NOW - 3600},
         "not_yet_valid"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(evidence.EvidenceError) as info:
            evidence.check_evidence(token, **kwargs)  # type: ignore[arg-type]
        assert info.value.reason == reason
    with pytest.raises(evidence.EvidenceError) as info:
        evidence.check_evidence(token[:-4] + "!!!!", signer=device.public_key(),
                                attested=agent.public_key(), now=NOW)
    assert info.value.reason in ("malformed", "bad_signature")


def test_handle_private_key_never_exposes_private_material(keys: MemoryKeyStore) -> None:
    adapter = bx.HandlePrivateKey(keys.generate("k"))
    assert adapter.key_size == 256 and isinstance(adapter.curve, ec.SECP256R1)
    with pytest.raises(NotImplementedError):
        adapter.private_numbers()
    with pytest.raises(NotImplementedError):
        adapter.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    with pytest.raises(NotImplementedError):
        adapter.exchange(ec.ECDH(), adapter.public_key())


def _pki(keys: MemoryKeyStore, now: int = NOW, *, agent_ttl: int = 600,
         device_days: int = 30) -> dict[str, x509.Certificate | KeyHandle]:
    ca, dev, ag = keys.generate("ca"), keys.generate("dev"), keys.generate("ag")
    root = bx.root_certificate(ca, name="Root", now=now, days=365, serial=1)
    devc = bx.device_certificate(ca_key=ca, ca_cert=root, device_public=dev.public_key(),
                                 device_id="d1", trust_domain="example.org", now=now,
                                 days=device_days, serial=2)
    agc = bx.agent_certificate(device_key=dev, device_cert=devc, now=now, request=bx.AgentCertRequest(
        "spiffe://example.org/agent/a", "a", ag.public_key(), 3, agent_ttl))
    return {"root": root, "device": devc, "agent": agc, "dev_key": dev, "ag_key": ag}


def _openssl_verify(tmp: Path, root: x509.Certificate, device: x509.Certificate,
                    leaf: x509.Certificate, *extra: str) -> subprocess.CompletedProcess[str]:
    for name, cert in (("root", root), ("device", device), ("leaf", leaf)):
        (tmp / f"{name}.pem").write_text(bx.to_pem(cert))
    return subprocess.run(["openssl", "verify", *extra, "-CAfile", str(tmp / "root.pem"),
                           "-untrusted", str(tmp / "device.pem"), str(tmp / "leaf.pem")],
                          capture_output=True, text=True, check=False)


def test_agent_chain_verifies_with_openssl_and_its_crl_revokes(keys: MemoryKeyStore,
                                                               tmp_path: Path) -> None:
    pki = _pki(keys)
    root, devc, agc = pki["root"], pki["device"], pki["agent"]
    assert isinstance(root, x509.Certificate) and isinstance(devc, x509.Certificate)
    assert isinstance(agc, x509.Certificate)
    ok = _openssl_verify(tmp_path, root, devc, agc, "-attime", str(NOW))
    assert ok.returncode == 0, ok.stderr
    san = agc.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/agent/a"]
    assert agc.not_valid_after_utc.timestamp() - NOW == 600
    dev_key = pki["dev_key"]
    assert not isinstance(dev_key, x509.Certificate)
    crl = bx.agent_crl(device_key=dev_key, device_cert=devc, now=NOW, next_update_seconds=3600,
                       number=1, revoked=[bx.RevokedSerial(3, NOW, x509.ReasonFlags.key_compromise)])
    (tmp_path / "crl.pem").write_text(bx.to_pem(crl))
    bad = _openssl_verify(tmp_path, root, devc, agc, "-attime", str(NOW), "-crl_check",
                          "-CRLfile", str(tmp_path / "crl.pem"))
    assert bad.returncode != 0 and "revoked" in bad.stderr


@pytest.mark.parametrize(("case", "at", "fragment"), [
    ("expired leaf", NOW + 601 + 86400, "expired"),
    ("not yet valid", NOW - 3600, "not yet valid"),
])
def test_openssl_refuses_chains_outside_validity(keys: MemoryKeyStore, tmp_path: Path, case: str,
                                                 at: int, fragment: str) -> None:
    pki = _pki(keys)
    r = _openssl_verify(tmp_path, pki["root"], pki["device"], pki["agent"],  # type: ignore[arg-type]
                        "-attime", str(at))
    assert r.returncode != 0 and fragment in r.stderr, case


def test_agent_cert_never_outlives_device_cert(keys: MemoryKeyStore) -> None:
    pki = _pki(keys, device_days=1, agent_ttl=24 * 3600)
    devc, agc = pki["device"], pki["agent"]
    assert isinstance(devc, x509.Certificate) and isinstance(agc, x509.Certificate)
    assert agc.not_valid_after_utc <= devc.not_valid_after_utc
    with pytest.raises(ValueError):
        bx.agent_certificate(device_key=pki["dev_key"], device_cert=devc,  # type: ignore[arg-type]
                             now=NOW, request=bx.AgentCertRequest(
                                 "spiffe://example.org/agent/a", "a",
                                 keys.generate("x").public_key(), 9, 24 * 3600 + 1))


def test_csr_carries_evidence_and_proves_possession(keys: MemoryKeyStore) -> None:
    k = keys.generate("k")
    csr = bx.build_csr(k, common_name="a", uris=["spiffe://example.org/agent/a"], evidence=b"EV")
    assert csr.is_signature_valid and bx.same_public_key(k.public_key(), csr.public_key())
    assert bx.csr_evidence(csr) == b"EV" and bx.csr_uris(csr) == ["spiffe://example.org/agent/a"]
    # openssl agrees the CSR is self-consistent (signed by the key it names)
    r = subprocess.run(["openssl", "req", "-verify", "-noout"], input=bx.to_pem(csr),
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "OK" in (r.stdout + r.stderr)


@pytest.mark.softhsm
def test_builders_sign_with_a_softhsm_key(pkcs11_store: object, softhsm_token: Any,
                                          tmp_path: Path) -> None:
    """The adapter over a real token key: CSR, root, device and agent
    certificates and a CRL, checked by openssl -- no private key in Python."""
    import uuid

    from badged.keystore.port import KeyStore

    assert isinstance(pkcs11_store, KeyStore)
    names = [f"test/cred/{uuid.uuid4().hex[:12]}/{n}" for n in ("ca", "dev", "agent")]
    ca, dev, agent = (pkcs11_store.generate(n) for n in names)
    try:
        csr = bx.build_csr(dev, common_name="d", uris=["spiffe://example.org/device/d"])
        assert csr.is_signature_valid
        pki = {
            "root": bx.root_certificate(ca, name="HSM Root", now=NOW, days=30, serial=11),
        }
        pki["device"] = bx.device_certificate(
            ca_key=ca, ca_cert=pki["root"], device_public=dev.public_key(), device_id="d",
            trust_domain="example.org", now=NOW, days=10, serial=12)
        pki["agent"] = bx.agent_certificate(
            device_key=dev, device_cert=pki["device"], now=NOW, request=bx.AgentCertRequest(
                "spiffe://example.org/agent/a", "a", agent.public_key(), 13, 600))
        r = _openssl_verify(tmp_path, pki["root"], pki["device"], pki["agent"], "-attime",
                            str(NOW + 10))
        assert r.returncode == 0, r.stderr
        props = pkcs11_store.properties(names[2])
        token = _evidence(dev, agent, props=props)
        claims = evidence.check_evidence(token, signer=dev.public_key(),
                                         attested=agent.public_key(), now=NOW)
        assert claims["hwkey"]["never_extractable"] is True and "token_uri" in claims["hwkey"]
        uri = claims["hwkey"]["token_uri"]
        assert "pin-source" not in uri and "pin-value" not in uri
        pin = softhsm_token.pin_file.read_text().strip()
        assert len(pin) >= 8 and pin not in json.dumps(claims)
    finally:
        for n in names:
            pkcs11_store.destroy(n)


def test_evidence_checker_only_raises_evidence_errors(keys: MemoryKeyStore) -> None:
    """The CA runs this on files from outside: odd claims give EvidenceError."""
    import random

    from badged.core.jose import encode_jws
    from badged.core.tokens import ES256

    device, agent = keys.generate("dev"), keys.generate("agent")
    base = json.loads(b64url_decode(_evidence(device, agent).split(".")[1]))
    weird: list[object] = [None, True, 1.5, "", [], {}, {"jwk": {"kty": "EC"}}, {"jwk": 3},
                           {"sensitive": "yes"}, 2**80, "urn:badged:eat:tpm2-certify:v1",
                           {"attest": "%%"}, {"attest": "AA", "signature": "AA", "ak_public": "AA",
                                              "key_public": "AA"}]
    rng = random.Random(5)
    for _ in range(300):
        claims = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            claims[rng.choice([*claims, "tpm2_certify"])] = rng.choice(weird)
        token = encode_jws({"alg": "ES256", "typ": evidence.EVIDENCE_TYP}, claims,
                           lambda d: device.sign(d, ES256))
        try:
            evidence.check_evidence(token, signer=device.public_key(),
                                    attested=agent.public_key(), now=NOW)
        except evidence.EvidenceError:
            pass
    garbage = [{"attest": b64url(bytes(rng.randrange(256) for _ in range(n))), "signature": "AA",
                "ak_public": b64url(b"\x00\x23" + bytes(n)), "key_public": b64url(bytes(n))}
               for n in (0, 1, 2, 8, 40, 200)]
    for certify in garbage:
        claims = {**base, "eat_profile": evidence.TPM2_CERTIFY_PROFILE, "tpm2_certify": certify}
        token = encode_jws({"alg": "ES256", "typ": evidence.EVIDENCE_TYP}, claims,
                           lambda d: device.sign(d, ES256))
        with pytest.raises(evidence.EvidenceError):
            evidence.check_evidence(token, signer=device.public_key(),
                                    attested=agent.public_key(), now=NOW)
