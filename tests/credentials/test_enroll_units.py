"""Enrollment logic without a daemon: what the CA checks before signing and
what the device checks before accepting a chain (software keys; the e2e
tests run the same code over SoftHSM)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from badged.core import x509 as bx
from badged.enroll.ca import RequestRejected, check_request
from badged.enroll.device import ChainRejected, check_device_chain, device_id, enrollment_request
from badged.keystore.memory import MemoryKeyStore
from badged.keystore.port import KeyHandle, KeyProperties

NOW = 1_800_000_000
TD = "example.org"
GOOD = KeyProperties(backend="pkcs11", sensitive=True, extractable=False, never_extractable=True,
                     local=True, extra={"token": "pkcs11:token=t"})


def _request(dev: KeyHandle, props: KeyProperties = GOOD, now: int = NOW) -> dict[str, Any]:
    return enrollment_request(device_key=dev, props=props, trust_domain=TD, now=now, nonce="n")


def _b(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def test_good_request_passes_and_names_the_device() -> None:
    dev = MemoryKeyStore().generate("dev")
    csr, td, dev_id = check_request(_b(_request(dev)), now=NOW)
    assert td == TD and dev_id == device_id(dev) and csr.is_signature_valid


def _swap_csr(doc: dict[str, Any], csr: x509.CertificateSigningRequest) -> dict[str, Any]:
    return {**doc, "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}


def _forged_csr(doc: dict[str, Any], *, keep_san: bool = True, keep_evidence: bool = True,
                san: str | None = None) -> x509.CertificateSigningRequest:
    real = x509.load_pem_x509_csr(doc["csr"].encode())
    other = ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(real.subject)
    if keep_san:
        uri = san or real.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)[0]
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                            critical=False)
    if keep_evidence:
        b = b.add_extension(real.extensions.get_extension_for_oid(bx.EVIDENCE_OID).value,
                            critical=False)
    return b.sign(other, hashes.SHA256())


@pytest.mark.parametrize(("case", "mutate", "reason"), [
    ("not json", lambda d, dev: b"{", "malformed"),
    ("wrong format", lambda d, dev: _b({**d, "format": "x"}), "malformed"),
    ("csr not PEM", lambda d, dev: _b({**d, "csr": "nope"}), "malformed"),
    ("oversized", lambda d, dev: b" " * (70 * 1024), "oversized"),
    ("CSR for another key with the device's evidence",
     lambda d, dev: _b(_swap_csr(d, _forged_csr(d))), "evidence_bad_signature"),
    ("no evidence", lambda d, dev: _b(_swap_csr(d, _forged_csr(d, keep_evidence=False))),
     "no_evidence"),
    ("extractable key", lambda d, dev: _b(_request(dev, KeyProperties(
        "pkcs11", True, True, False, True))), "evidence_extractable"),
    ("imported key", lambda d, dev: _b(_request(dev, KeyProperties(
        "pkcs11", True, False, True, False))), "evidence_not_generated_in_token"),
    ("stale evidence", lambda d, dev: _b(_request(dev, now=NOW - 30 * 86400)),
     "evidence_expired"),
])
def test_ca_refusals(case: str, mutate: Any, reason: str) -> None:
    dev = MemoryKeyStore().generate("dev")
    doc = _request(dev)
    with pytest.raises(RequestRejected) as info:
        check_request(mutate(doc, dev), now=NOW)
    assert info.value.reason == reason, case


def test_ca_refuses_other_trust_domain() -> None:
    dev = MemoryKeyStore().generate("dev")
    with pytest.raises(RequestRejected) as info:
        check_request(_b(_request(dev)), now=NOW, trust_domains=frozenset({"other.org"}))
    assert info.value.reason == "trust_domain"


def _chain(keys: MemoryKeyStore, dev: KeyHandle, *, days: int = 30, now: int = NOW,
           td: str = TD, dev_id: str | None = None) -> list[x509.Certificate]:
    ca = keys.generate("ca")
    root = bx.root_certificate(ca, name="R", now=now, days=365, serial=1)
    cert = bx.device_certificate(ca_key=ca, ca_cert=root, device_public=dev.public_key(),
                                 device_id=dev_id or device_id(dev), trust_domain=td, now=now,
                                 days=days, serial=2)
    return [cert, root]


@pytest.mark.parametrize(("case", "reason"), [
    ("good", None),
    ("chain for another key", "key_mismatch"),
    ("root only", "key_mismatch"),
    ("expired", "expired"),
    ("other trust domain", "wrong_identity"),
    ("broken link", "broken_chain"),
    ("leaf not a CA", "not_a_ca"),
])
def test_device_chain_table(case: str, reason: str | None) -> None:
    keys = MemoryKeyStore()
    dev = keys.generate("dev")
    now = NOW
    chain = _chain(keys, dev)
    if case == "chain for another key":
        chain = _chain(MemoryKeyStore(), keys.generate("other"))
    elif case == "root only":
        chain = chain[1:]
    elif case == "expired":
        now = NOW + 31 * 86400
    elif case == "other trust domain":
        chain = _chain(MemoryKeyStore(), dev, td="other.org")
    elif case == "broken link":
        chain = [chain[0], _chain(MemoryKeyStore(), keys.generate("x"))[1]]
    elif case == "leaf not a CA":
        leaf = bx.agent_certificate(device_key=keys.generate("ca2"), device_cert=chain[1], now=NOW,
                                    request=bx.AgentCertRequest(
                                        f"spiffe://{TD}/device/{device_id(dev)}", "d",
                                        dev.public_key(), 5, 600))
        chain = [leaf, chain[1]]
    if reason is None:
        check_device_chain(chain, device_key=dev, trust_domain=TD, now=now)
        return
    with pytest.raises(ChainRejected) as info:
        check_device_chain(chain, device_key=dev, trust_domain=TD, now=now)
    assert info.value.reason == reason, case


def test_evidence_says_what_it_is() -> None:
    """PKCS#11 evidence is labelled the token's own statement, and a label that
    contradicts the profile is refused."""
    from badged.core import evidence
    from badged.core.jose import b64url_decode, encode_jws
    from badged.core.tokens import ES256

    dev = MemoryKeyStore().generate("dev")
    claims = evidence.build_evidence_claims(
        issuer="spiffe://td/device/d", subject="spiffe://td/device/d", attested=dev.public_key(),
        props=GOOD, now=NOW, ttl_seconds=600)
    assert claims["statement"] == "token-statement"
    token = evidence.sign_evidence(claims, device_key=dev)
    assert evidence.check_evidence(token, signer=dev.public_key(), attested=dev.public_key(),
                                   now=NOW)["statement"] == "token-statement"
    h, p, _ = token.split(".")
    lying = {**json.loads(b64url_decode(p)), "statement": "tpm2-certify"}
    forged = encode_jws(json.loads(b64url_decode(h)), lying, lambda d: dev.sign(d, ES256))
    with pytest.raises(evidence.EvidenceError) as info:
        evidence.check_evidence(forged, signer=dev.public_key(), attested=dev.public_key(), now=NOW)
    assert info.value.reason == "wrong_statement"
