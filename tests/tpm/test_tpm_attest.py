"""Key attestation on a real swtpm, checked by the pure verifier and by tools
that share no code with it (tpm2-tools, the openssl CLI).

Forged evidence (software "AKs", altered attributes) is built here byte by
byte from the TCG structures, so each rejection reason is reached on purpose.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from badged.core import tpm_evidence as te
from badged.errors import AttestationError, InvalidRequestError, KeyNotFoundError
from badged.keystore.attest import FORMAT_TPM2_CERTIFY, KeyAttestation, KeyAttester
from badged.keystore.tpm.store import TpmConfig, TpmKeyStore
from tests.tpm_fixtures import SwtpmInstance

ES256 = ec.ECDSA(hashes.SHA256())


def _ca_key(inst: SwtpmInstance) -> Any:
    return x509.load_pem_x509_certificate(inst.provisioned.root_ca_cert.read_bytes()).public_key()


def _intermediates(inst: SwtpmInstance) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(inst.provisioned.issuer_cert.read_bytes())]


def _enroll(store: TpmKeyStore) -> bytes:
    """The verifier's enrollment: MakeCredential to the certified EK for the
    AK's Name; only that TPM returns the secret. Returns the AK Name to pin."""
    ek_der = store.ek_certificate()
    assert ek_der is not None
    ek_key = x509.load_der_x509_certificate(ek_der).public_key()
    assert isinstance(ek_key, rsa.RSAPublicKey)
    ak_name = te.tpm_name(store.ak_public())
    challenge = te.make_credential(ek_key, ak_name)
    assert (
        store.activate_credential(challenge.credential_blob, challenge.encrypted_secret) == challenge.secret
    )
    return ak_name


# -- forging helpers (pure) ---------------------------------------------------------------


def _ecc_public(key: ec.EllipticCurvePublicKey, attrs: int, scheme: int = te.ALG_NULL) -> bytes:
    nums = key.public_numbers()
    scheme_part = struct.pack(">H", scheme) + (
        struct.pack(">H", te.ALG_SHA256) if scheme != te.ALG_NULL else b""
    )
    return (
        struct.pack(">HHI", te.ALG_ECC, te.ALG_SHA256, attrs)
        + struct.pack(">H", 0)
        + struct.pack(">H", te.ALG_NULL)
        + scheme_part
        + struct.pack(">HH", te.ECC_NIST_P256, te.ALG_NULL)
        + struct.pack(">H", 32)
        + nums.x.to_bytes(32, "big")
        + struct.pack(">H", 32)
        + nums.y.to_bytes(32, "big")
    )


def _attest(
    certified_name: bytes,
    nonce: bytes,
    magic: int = te.TPM_GENERATED_VALUE,
    typ: int = te.TPM_ST_ATTEST_CERTIFY,
) -> bytes:
    def b(x: bytes) -> bytes:
        return struct.pack(">H", len(x)) + x

    return (
        struct.pack(">IH", magic, typ)
        + b(b"\x00\x0b" + b"\x11" * 32)
        + b(nonce)
        + struct.pack(">QIIB", 1000, 1, 0, 1)
        + struct.pack(">Q", 42)
        + b(certified_name)
        + b(b"")
    )


AK_ATTRS = (
    te.RESTRICTED | te.SIGN | te.FIXED_TPM | te.FIXED_PARENT | te.SENSITIVE_DATA_ORIGIN | te.USER_WITH_AUTH
)
KEY_ATTRS = te.SIGN | te.FIXED_TPM | te.FIXED_PARENT | te.SENSITIVE_DATA_ORIGIN | te.USER_WITH_AUTH


def _forge(
    nonce: bytes, key_attrs: int = KEY_ATTRS, ak_attrs: int = AK_ATTRS, **attest_kw: Any
) -> KeyAttestation:
    """Evidence from a software 'AK': well-formed, but no TPM was involved."""
    ak = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    key_public = _ecc_public(key.public_key(), key_attrs)
    attest = _attest(te.tpm_name(key_public), nonce, **attest_kw)
    return KeyAttestation(
        format=FORMAT_TPM2_CERTIFY,
        key_name="forged",
        nonce=nonce,
        attest=attest,
        signature=ak.sign(attest, ES256),
        ak_public=_ecc_public(ak.public_key(), ak_attrs, te.ALG_ECDSA),
        key_public=key_public,
    )


# -- real evidence --------------------------------------------------------------------------


@pytest.mark.tpm
def test_real_evidence_verifies_with_ek_chain_and_enrolled_ak(
    tpm_store: TpmKeyStore, swtpm_instance: SwtpmInstance
) -> None:
    assert isinstance(tpm_store, KeyAttester)
    key = tpm_store.generate("agent/att")
    ak_name = _enroll(tpm_store)
    nonce = os.urandom(32)
    ev = tpm_store.attest("agent/att", nonce)
    assert ev.format == FORMAT_TPM2_CERTIFY and ev.ek_certificate is not None
    verified = te.verify_certify(
        ev,
        nonce,
        trusted_ak_names={ak_name},
        expected_public_key=key.public_key(),
        ek_ca_keys=[_ca_key(swtpm_instance)],
        ek_intermediates=_intermediates(swtpm_instance),
    )
    assert verified.public_key.public_numbers() == key.public_key().public_numbers()
    assert verified.ak_name == ak_name
    assert verified.key_tpm_name.hex() == tpm_store.properties("agent/att").extra["tpm_name"]
    # The AK is re-created identically: pinned once, valid after a TPM restart.
    tpm_store.close()
    swtpm_instance.restart()
    again = TpmKeyStore.from_config(TpmConfig(tcti=swtpm_instance.tcti, key_dir=str(swtpm_instance.key_dir)))
    try:
        nonce2 = os.urandom(16)
        te.verify_certify(again.attest("agent/att", nonce2), nonce2, trusted_ak_names={ak_name})
    finally:
        again.close()


@pytest.mark.tpm
def test_stale_nonce_other_key_tampering_and_wrong_ak_are_rejected(tpm_store: TpmKeyStore) -> None:
    tpm_store.generate("agent/a")
    other = tpm_store.generate("agent/b")
    ak_name = _enroll(tpm_store)
    old_nonce = os.urandom(32)
    old = tpm_store.attest("agent/a", old_nonce)
    nonce = os.urandom(32)
    ev = tpm_store.attest("agent/a", nonce)
    te.verify_certify(ev, nonce, trusted_ak_names={ak_name})

    with pytest.raises(AttestationError, match="stale or replayed"):
        te.verify_certify(old, nonce, trusted_ak_names={ak_name})
    ev_b = tpm_store.attest("agent/b", nonce)
    with pytest.raises(AttestationError, match="certified another key"):
        te.verify_certify(dataclasses.replace(ev, key_public=ev_b.key_public), nonce)
    with pytest.raises(AttestationError, match="not the key in question"):
        te.verify_certify(ev, nonce, expected_public_key=other.public_key())
    for pos in (10, 40, len(ev.attest) - 1):
        tampered = bytearray(ev.attest)
        tampered[pos] ^= 0x01
        with pytest.raises(AttestationError, match="bad AK signature"):
            te.verify_certify(dataclasses.replace(ev, attest=bytes(tampered)), nonce)
    # Another AK's public area: signature fails; a re-signed forgery fails enrollment.
    forged = _forge(nonce)
    with pytest.raises(AttestationError, match="bad AK signature"):
        te.verify_certify(dataclasses.replace(ev, ak_public=forged.ak_public), nonce)
    te.verify_certify(forged, nonce)  # well-formed: only the AK pin can tell it from a TPM ...
    with pytest.raises(AttestationError, match="not enrolled"):
        te.verify_certify(forged, nonce, trusted_ak_names={ak_name})  # ... and it does


@pytest.mark.tpm
def test_key_of_another_tpm_is_rejected(tpm_store: TpmKeyStore, swtpm_instance: SwtpmInstance) -> None:
    """Changing the endorsement seed makes this a different TPM (new EK, new AK):
    evidence from it does not verify against the AK enrolled before."""
    from tpm2_pytss.constants import ESYS_TR

    tpm_store.generate("agent/x")
    ak_name = _enroll(tpm_store)
    tpm_store.close()
    ectx = swtpm_instance.esapi()
    ectx.change_eps(ESYS_TR.RH_PLATFORM)
    ectx.close()
    other = TpmKeyStore.from_config(TpmConfig(tcti=swtpm_instance.tcti, key_dir=str(swtpm_instance.key_dir)))
    try:
        nonce = os.urandom(32)
        ev = other.attest("agent/x", nonce)
        te.verify_certify(ev, nonce)  # a genuine TPM2_Certify ...
        with pytest.raises(AttestationError, match="not enrolled"):
            te.verify_certify(ev, nonce, trusted_ak_names={ak_name})  # ... by a TPM we never enrolled
        # And that TPM cannot answer a challenge made for the old EK certificate's key.
        ek_key = x509.load_der_x509_certificate(ev.ek_certificate or b"").public_key()
        assert isinstance(ek_key, rsa.RSAPublicKey)
        challenge = te.make_credential(ek_key, te.tpm_name(other.ak_public()))
        with pytest.raises(AttestationError, match="activation failed"):
            other.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    finally:
        other.close()


@pytest.mark.tpm
def test_activation_is_bound_to_the_ak_name(tpm_store: TpmKeyStore) -> None:
    ek_key = x509.load_der_x509_certificate(tpm_store.ek_certificate() or b"").public_key()
    assert isinstance(ek_key, rsa.RSAPublicKey)
    wrong_name = b"\x00\x0b" + hashlib.sha256(b"not the AK").digest()
    challenge = te.make_credential(ek_key, wrong_name)
    with pytest.raises(AttestationError):
        tpm_store.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    with pytest.raises(InvalidRequestError):
        tpm_store.activate_credential(b"\x00", b"")
    _enroll(tpm_store)  # the store is still healthy, and slots were freed


@pytest.mark.tpm
def test_ek_chain_pins_the_ca_key(tpm_store: TpmKeyStore, swtpm_instance: SwtpmInstance) -> None:
    tpm_store.generate("agent/ek")
    nonce = os.urandom(32)
    ev = tpm_store.attest("agent/ek", nonce)
    imposter = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    with pytest.raises(AttestationError, match="does not chain"):
        te.verify_certify(ev, nonce, ek_ca_keys=[imposter], ek_intermediates=_intermediates(swtpm_instance))
    with pytest.raises(AttestationError, match="does not chain"):  # root pinned, intermediate missing
        te.verify_certify(ev, nonce, ek_ca_keys=[_ca_key(swtpm_instance)])
    issuer = _intermediates(swtpm_instance)[0].public_key()
    assert isinstance(issuer, rsa.RSAPublicKey)
    te.verify_certify(ev, nonce, ek_ca_keys=[issuer])  # pinning the issuing CA's key works too


@pytest.mark.tpm
def test_missing_ek_certificate(swtpm_instance: SwtpmInstance) -> None:
    from tpm2_pytss.constants import ESYS_TR

    ectx = swtpm_instance.esapi()
    for index in (0x01C00002, 0x01C00016):
        ectx.nv_undefine_space(ectx.tr_from_tpmpublic(index), ESYS_TR.RH_PLATFORM)
    ectx.close()
    store = TpmKeyStore.from_config(TpmConfig(tcti=swtpm_instance.tcti, key_dir=str(swtpm_instance.key_dir)))
    try:
        store.generate("agent/noek")
        nonce = os.urandom(32)
        ev = store.attest("agent/noek", nonce)
        assert ev.ek_certificate is None
        te.verify_certify(ev, nonce)
        with pytest.raises(AttestationError, match="no EK certificate"):
            te.verify_certify(ev, nonce, ek_ca_keys=[_ca_key(swtpm_instance)])
    finally:
        store.close()


@pytest.mark.tpm
def test_attest_input_errors(tpm_store: TpmKeyStore) -> None:
    tpm_store.generate("agent/in")
    with pytest.raises(InvalidRequestError):
        tpm_store.attest("agent/in", b"short")
    with pytest.raises(InvalidRequestError):
        tpm_store.attest("agent/in", b"x" * 65)
    with pytest.raises(KeyNotFoundError):
        tpm_store.attest("agent/none", os.urandom(16))


@pytest.mark.tpm
def test_attest_with_many_keys_keeps_within_slots(
    tpm_store: TpmKeyStore, swtpm_instance: SwtpmInstance
) -> None:
    keys = [tpm_store.generate(f"agent/s{i}") for i in range(5)]
    for key in keys:
        key.sign(b"warm the cache", ES256)
        nonce = os.urandom(20)
        te.verify_certify(tpm_store.attest(key.name, nonce), nonce, expected_public_key=key.public_key())
        key.sign(b"and sign again", ES256)


# -- pure verifier: every rejection reason ------------------------------------------------


@pytest.mark.parametrize(
    ("key_attrs", "reason"),
    [
        (KEY_ATTRS & ~te.FIXED_TPM, "not fixedTPM"),
        (KEY_ATTRS & ~te.FIXED_PARENT, "not fixedParent"),
        (KEY_ATTRS & ~te.SENSITIVE_DATA_ORIGIN, "imported"),
        (KEY_ATTRS & ~te.SIGN, "cannot sign"),
        (KEY_ATTRS | te.DECRYPT, "decrypt"),
        (KEY_ATTRS | te.RESTRICTED, "restricted"),
    ],
)
def test_verifier_rejects_key_attributes(key_attrs: int, reason: str) -> None:
    nonce = os.urandom(16)
    te.verify_certify(_forge(nonce), nonce)
    with pytest.raises(AttestationError, match=reason):
        te.verify_certify(_forge(nonce, key_attrs=key_attrs), nonce)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"ak_attrs": AK_ATTRS & ~te.RESTRICTED}, "AK attributes"),
        ({"ak_attrs": AK_ATTRS | te.DECRYPT}, "AK attributes"),
        ({"magic": 0xFF544348}, "not a TPM-generated"),
        ({"typ": te.TPM_ST_ATTEST_QUOTE}, "not a TPM2_Certify"),
    ],
)
def test_verifier_rejects_forged_structure(kw: dict[str, Any], reason: str) -> None:
    nonce = os.urandom(16)
    with pytest.raises(AttestationError, match=reason):
        te.verify_certify(_forge(nonce, **kw), nonce)


def test_verifier_rejects_garbage() -> None:
    nonce = os.urandom(16)
    ev = _forge(nonce)
    with pytest.raises(AttestationError, match="truncated"):
        te.verify_certify(dataclasses.replace(ev, ak_public=ev.ak_public[:-3]), nonce)
    with pytest.raises(AttestationError, match="trailing"):
        te.verify_certify(dataclasses.replace(ev, key_public=ev.key_public + b"\0"), nonce)
    with pytest.raises(AttestationError, match="format"):
        te.verify_certify(dataclasses.replace(ev, format="pkcs11-attributes"), nonce)
    with pytest.raises(AttestationError, match="too short"):
        te.verify_certify(ev, b"")
    with pytest.raises(AttestationError, match="not valid DER"):
        te.verify_certify(dataclasses.replace(ev, ek_certificate=b"\x30\x03abc"), nonce)
    bad_point = ev.key_public[:-1] + bytes([ev.key_public[-1] ^ 1])
    with pytest.raises(AttestationError, match="not on the curve"):
        te.parse_public(bad_point)


# -- independent cross-checks with tpm2-tools and openssl -----------------------------------


def _tools(inst: SwtpmInstance, *args: str, cwd: Path) -> str:
    """Run one tpm2-tools command, then flush its leftovers (no resource manager)."""
    env = dict(os.environ, TPM2TOOLS_TCTI=inst.tcti, TSS2_LOG="all+none")
    out = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, f"{args[0]} failed: {out.stderr[-400:]}"
    subprocess.run(
        ["tpm2_flushcontext", "-t"], cwd=cwd, env=env, capture_output=True, timeout=30, check=False
    )
    return out.stdout


needs_tools = pytest.mark.skipif(
    shutil.which("tpm2_certify") is None or shutil.which("openssl") is None,
    reason="tpm2-tools / openssl CLI not installed",
)


@pytest.mark.tpm
@needs_tools
def test_certify_made_by_tpm2_tools_passes_our_checks(swtpm_instance: SwtpmInstance) -> None:
    """tpm2-tools 5.4 makes the TPM2_Certify (its own key, its own AK); our pure
    parser and rules accept it. (5.4 cannot pass a nonce: it always uses
    extraData 00ff55aa, so the nonce rule is checked on that value.)"""
    d = swtpm_instance.base
    _tools(
        swtpm_instance,
        "tpm2_createprimary",
        "-Q",
        "-C",
        "o",
        "-g",
        "sha256",
        "-G",
        "ecc256:null:aes128cfb",
        "-a",
        "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
        "-c",
        "srk.ctx",
        cwd=d,
    )
    _tools(
        swtpm_instance,
        "tpm2_create",
        "-Q",
        "-C",
        "srk.ctx",
        "-G",
        "ecc256",
        "-a",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign|noda",
        "-u",
        "key.pub",
        "-r",
        "key.priv",
        cwd=d,
    )
    _tools(
        swtpm_instance,
        "tpm2_load",
        "-Q",
        "-C",
        "srk.ctx",
        "-u",
        "key.pub",
        "-r",
        "key.priv",
        "-c",
        "key.ctx",
        cwd=d,
    )
    _tools(
        swtpm_instance,
        "tpm2_createprimary",
        "-Q",
        "-C",
        "e",
        "-g",
        "sha256",
        "-G",
        "ecc256:ecdsa-sha256:null",
        "-a",
        "restricted|sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
        "-c",
        "ak.ctx",
        cwd=d,
    )
    _tools(swtpm_instance, "tpm2_readpublic", "-Q", "-c", "ak.ctx", "-o", "ak.pub", cwd=d)
    _tools(
        swtpm_instance,
        "tpm2_certify",
        "-c",
        "key.ctx",
        "-C",
        "ak.ctx",
        "-g",
        "sha256",
        "-o",
        "attest.out",
        "-s",
        "sig.out",
        "-f",
        "plain",
        cwd=d,
    )
    key_public = (d / "key.pub").read_bytes()[2:]  # TPM2B_PUBLIC -> TPMT_PUBLIC
    ak = te.parse_public((d / "ak.pub").read_bytes()[2:], "AK")
    attest = (d / "attest.out").read_bytes()
    ak.public_key.verify((d / "sig.out").read_bytes(), attest, ES256)
    info = te.parse_certify_info(attest)
    assert info.extra_data == bytes.fromhex("00ff55aa")
    assert info.certified_name == te.tpm_name(key_public)
    te.check_agent_key_attributes(te.parse_public(key_public).attributes)
    ev = KeyAttestation(
        format=FORMAT_TPM2_CERTIFY,
        key_name="tools",
        nonce=info.extra_data,
        attest=attest,
        signature=(d / "sig.out").read_bytes(),
        ak_public=ak.raw,
        key_public=key_public,
    )
    with pytest.raises(AttestationError, match="too short"):  # 4 bytes: replayable, refused by policy
        te.verify_certify(ev, info.extra_data)


@pytest.mark.tpm
@needs_tools
def test_our_evidence_checked_by_tpm2_print_and_openssl(
    tpm_store: TpmKeyStore, swtpm_instance: SwtpmInstance
) -> None:
    """Header fields read back by tpm2_print, the AK signature by the openssl CLI."""
    tpm_store.generate("agent/cli")
    nonce = os.urandom(24)
    ev = tpm_store.attest("agent/cli", nonce)
    d = swtpm_instance.base
    (d / "our.attest").write_bytes(ev.attest)
    (d / "our.sig").write_bytes(ev.signature)
    ak_pem = te.parse_public(ev.ak_public).public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (d / "ak.pem").write_bytes(ak_pem)
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "ak.pem", "-signature", "our.sig", "our.attest"],
        cwd=d,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0 and "Verified OK" in out.stdout, out.stdout + out.stderr
    env = dict(os.environ, TSS2_LOG="all+none")
    printed = subprocess.run(
        ["tpm2_print", "-t", "TPMS_ATTEST", "our.attest"],
        cwd=d,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    assert "magic: ff544347" in printed and "type: 8017" in printed
    assert f"extraData: {nonce.hex()}" in printed
    tampered = bytearray(ev.attest)
    tampered[-5] ^= 1
    (d / "our.attest").write_bytes(bytes(tampered))
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "ak.pem", "-signature", "our.sig", "our.attest"],
        cwd=d,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode != 0


@pytest.mark.tpm
def test_attest_and_sign_from_many_threads(tpm_store: TpmKeyStore) -> None:
    """Certify needs all 3 swtpm slots; interleaved with signing on other keys
    from other threads it must neither run out of slots nor mix up keys."""
    import threading

    keys = [tpm_store.generate(f"agent/m{i}") for i in range(4)]
    errors: list[BaseException] = []

    def signer(i: int) -> None:
        try:
            for j in range(60):
                key = keys[(i + j) % len(keys)]
                key.public_key().verify(key.sign(b"m%d" % j, ES256), b"m%d" % j, ES256)
        except BaseException as exc:
            errors.append(exc)

    def attester() -> None:
        try:
            for j in range(20):
                key = keys[j % len(keys)]
                nonce = os.urandom(16)
                ev = tpm_store.attest(key.name, nonce)
                te.verify_certify(ev, nonce, expected_public_key=key.public_key())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=signer, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=attester))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert all(not t.is_alive() for t in threads)
