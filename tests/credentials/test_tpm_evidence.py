"""Key evidence with the TPM's own word: a TPM2_Certify (real swtpm) inside
the device-signed evidence, bound to it by a nonce derived from its claims."""

from __future__ import annotations

import json
from typing import Any

import pytest

from badged.core import evidence
from badged.core.jose import b64url, b64url_decode, canonical_json
from badged.keystore.attest import KeyAttester
from badged.keystore.memory import MemoryKeyStore
from badged.keystore.tpm.store import TpmKeyStore

pytestmark = [pytest.mark.tpm]
NOW = 1_800_000_000


def _build(tpm_store: Any, name: str, device: Any, *, nonce: str | None = "n1") -> str:
    handle = tpm_store.get(name)
    claims = evidence.build_evidence_claims(
        issuer="spiffe://example.org/device/d", subject="spiffe://example.org/agent/a",
        attested=handle.public_key(), props=tpm_store.properties(name), now=NOW,
        ttl_seconds=600, nonce=nonce, certify=lambda n: tpm_store.attest(name, n))
    return evidence.sign_evidence(claims, device_key=device)


def _resign(token: str, device: Any, mutate: Any) -> str:
    from badged.core.jose import encode_jws
    from badged.core.tokens import ES256

    h, p, _ = token.split(".")
    claims = json.loads(b64url_decode(p))
    mutate(claims)
    return encode_jws(json.loads(b64url_decode(h)), claims, lambda d: device.sign(d, ES256))


def test_tpm_certify_in_evidence(tpm_store: Any) -> None:
    assert isinstance(tpm_store, KeyAttester) and isinstance(tpm_store, TpmKeyStore)
    device = MemoryKeyStore().generate("device")
    tpm_store.generate("agent-a")
    tpm_store.generate("agent-b")
    a, b = tpm_store.get("agent-a"), tpm_store.get("agent-b")
    token = _build(tpm_store, "agent-a", device)
    claims = evidence.check_evidence(token, signer=device.public_key(), attested=a.public_key(),
                                     now=NOW)
    assert claims["eat_profile"] == evidence.TPM2_CERTIFY_PROFILE
    assert claims["hwkey"]["backend"] == "tpm" and claims["hwkey"]["never_extractable"] is True
    # the certify of key b lifted into evidence about key a: another key, refused
    other = json.loads(b64url_decode(_build(tpm_store, "agent-b", device).split(".")[1]))
    cases = {
        "lifted certify": (lambda c: c.update(tpm2_certify=other["tpm2_certify"]),
                           "tpm_certify_invalid"),
        "other eat_nonce": (lambda c: c.update(eat_nonce="n2"), "tpm_certify_invalid"),
        "other iat": (lambda c: c.update(iat=c["iat"] - 1), "tpm_certify_invalid"),
        "no certify": (lambda c: c.pop("tpm2_certify"), "malformed"),
        "garbled attest": (lambda c: c["tpm2_certify"].update(attest=b64url(b"x" * 40)),
                           "tpm_certify_invalid"),
    }
    for case, (mutate, reason) in cases.items():
        forged = _resign(token, device, mutate)
        with pytest.raises(evidence.EvidenceError) as info:
            evidence.check_evidence(forged, signer=device.public_key(), attested=a.public_key(),
                                    now=NOW)
        assert info.value.reason == reason, case
    with pytest.raises(evidence.EvidenceError) as mismatch:
        evidence.check_evidence(token, signer=device.public_key(), attested=b.public_key(),
                                now=NOW)
    assert mismatch.value.reason == "key_mismatch"
    # pinning an AK that is not this TPM's refuses it
    with pytest.raises(evidence.EvidenceError) as pinned:
        evidence.check_evidence(token, signer=device.public_key(), attested=a.public_key(),
                                now=NOW, trusted_ak_names=[b"\x00\x0b" + b"\x00" * 32])
    assert pinned.value.reason == "tpm_certify_invalid"
    assert canonical_json(claims)  # serializable as is


def test_ca_requires_tpm_evidence_chained_to_the_ek_ca(tpm_store: Any, swtpm_instance: Any) -> None:
    """`badgectl ca sign --ek-ca`: a TPM-held device key whose EK chains to the
    pinned manufacturer key, certified by the activated AK, is accepted; PKCS#11
    evidence, other EK CAs and unactivated AKs are not."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from badged.core.tpm_evidence import tpm_name
    from badged.enroll.ca import RequestRejected, check_request
    from badged.enroll.device import enrollment_request

    tpm_store.generate("badged/device/v1")
    dev = tpm_store.get("badged/device/v1")

    def request(store: Any, key: Any, name: str | None) -> bytes:
        certify = (lambda n: store.attest(name, n)) if name else None
        doc = enrollment_request(device_key=key, props=store.properties(key.name),
                                 trust_domain="example.org", now=NOW, nonce="ca-1",
                                 certify=certify)
        return json.dumps(doc).encode()

    issuer = x509.load_pem_x509_certificate(swtpm_instance.provisioned.issuer_cert.read_bytes())
    tpm_req = request(tpm_store, dev, "badged/device/v1")
    # genuine TPM evidence still needs its AK activated (test_tpm_activation.py) ...
    with pytest.raises(RequestRejected) as unactivated:
        check_request(tpm_req, now=NOW, ek_ca_keys=[issuer.public_key()])
    assert unactivated.value.reason == "activation_required"
    ak_name = tpm_name(tpm_store.ak_public())
    with pytest.raises(RequestRejected) as unpinned:
        check_request(tpm_req, now=NOW, activated_ak_names=[ak_name])
    assert unpinned.value.reason == "ek_ca_required"
    # ... by this TPM's AK, not another
    with pytest.raises(RequestRejected) as other_ak:
        check_request(tpm_req, now=NOW, ek_ca_keys=[issuer.public_key()],
                      activated_ak_names=[b"\x00\x0b" + b"\x00" * 32])
    assert other_ak.value.reason == "evidence_tpm_certify_invalid"
    _, td, _ = check_request(tpm_req, now=NOW, ek_ca_keys=[issuer.public_key()],
                             activated_ak_names=[ak_name])
    assert td == "example.org"
    wrong_ca = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(RequestRejected) as other:
        check_request(tpm_req, now=NOW, ek_ca_keys=[wrong_ca])
    assert other.value.reason == "evidence_tpm_certify_invalid"
    soft = MemoryKeyStore()
    soft_key = soft.generate("dev")
    from badged.keystore.port import KeyProperties

    class _Props:
        def properties(self, name: str) -> KeyProperties:
            return KeyProperties("pkcs11", True, False, True, True)

    with pytest.raises(RequestRejected) as not_tpm:
        check_request(request(_Props(), soft_key, None), now=NOW, ek_ca_keys=[issuer.public_key()])
    assert not_tpm.value.reason == "evidence_not_tpm"
