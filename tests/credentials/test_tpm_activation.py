"""Credential activation at enrollment, against real swtpms and the real CA CLI.

The CA (``badgectl ca`` in its own process, SoftHSM key) trusts a TPM2_Certify
of the device key only after the AK answered a MakeCredential challenge
wrapped to the EK of the request's (pinned) EK certificate. The attacks are
performed for real: a request forged on a machine with no TPM (software AK,
hand-made TPMS_ATTEST, a genuine EK certificate copied from another request),
an AK from a second TPM presenting the first's EK certificate, and a response
replayed for another request. The challenge blob is cross-checked with
tpm2-tools (tpm2_makecredential / tpm2_activatecredential).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from badged.core import tpm_evidence as te
from badged.core.x509 import device_attestation
from badged.enroll import activation
from badged.enroll.device import device_id, enrollment_request
from badged.keystore.attest import FORMAT_TPM2_CERTIFY, KeyAttestation
from badged.keystore.memory import MemoryKeyStore
from badged.keystore.port import KeyHandle, KeyProperties
from badged.keystore.tpm.store import TpmConfig, TpmKeyStore
from tests.conftest import short_tmpdir
from tests.credentials.conftest import ctl
from tests.tpm_fixtures import SwtpmInstance

pytestmark = [pytest.mark.tpm]
TD = "example.org"
DEVICE_KEY = "badged/device/v1"
TPM_PROPS = KeyProperties("tpm", True, False, True, True)


@pytest.fixture
def ca(softhsm_available: None) -> Iterator[Path]:
    base = short_tmpdir("bac")
    ca_dir = base / "ca"
    ctl("ca", "ca_group", "init", "--dir", str(ca_dir))
    try:
        yield ca_dir
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _request(store: Any, key: KeyHandle, *, nonce: str, certify: Any = None) -> bytes:
    if certify is None:
        def certify(n: bytes) -> KeyAttestation:
            return store.attest(key.name, n)  # type: ignore[no-any-return]
    doc = enrollment_request(device_key=key, props=TPM_PROPS, trust_domain=TD, now=time.time(),
                             nonce=nonce, certify=certify)
    return json.dumps(doc).encode()


def _files(tmp: Path, **docs: bytes) -> dict[str, Path]:
    out = {}
    for name, data in docs.items():
        out[name] = tmp / f"{name}.json"
        out[name].write_bytes(data)
    return out


def _challenge(ca: Path, req: Path, ek_ca: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return ctl("ca", "ca_group", "challenge", str(req), "--dir", str(ca), "--ek-ca", str(ek_ca),
               "-o", str(out), check=False)


def _sign(ca: Path, req: Path, ek_ca: Path | None, out: Path, *extra: str
          ) -> subprocess.CompletedProcess[str]:
    args = ["ca", "ca_group", "sign", str(req), "--dir", str(ca), "-o", str(out),
            "--agent", "demo-agent", *extra]
    if ek_ca is not None:
        args += ["--ek-ca", str(ek_ca)]
    return ctl(*args, check=False)


def _activate(store: TpmKeyStore, key: KeyHandle, challenge: Path) -> bytes:
    doc = activation.activate(activation.parse_challenge(challenge.read_bytes()), store,
                              device_id=device_id(key), now=time.time())
    return json.dumps(doc).encode()


def test_activation_round_trip_and_replay(tpm_store: TpmKeyStore, swtpm_instance: SwtpmInstance,
                                          ca: Path, tmp_path: Path) -> None:
    ek_ca = swtpm_instance.provisioned.issuer_cert
    dev = tpm_store.generate(DEVICE_KEY)
    f = _files(tmp_path, req=_request(tpm_store, dev, nonce="n-1"),
               other=_request(tpm_store, dev, nonce="n-2"))
    chain = tmp_path / "chain.pem"
    # TPM evidence without activation: refused with a reason, nothing issued
    r = _sign(ca, f["req"], ek_ca, chain)
    assert r.returncode == 1 and "refused: activation_required" in r.stderr, r.stderr
    r = _sign(ca, f["req"], None, chain)
    assert r.returncode == 1 and "refused: ek_ca_required" in r.stderr, r.stderr
    assert not chain.exists()
    chal, chal2 = tmp_path / "chal.json", tmp_path / "chal2.json"
    assert _challenge(ca, f["req"], ek_ca, chal).returncode == 0
    assert _challenge(ca, f["other"], ek_ca, chal2).returncode == 0
    started = time.monotonic()
    resp = _activate(tpm_store, dev, chal)
    activate_ms = (time.monotonic() - started) * 1000
    resp2 = _activate(tpm_store, dev, chal2)
    f.update(_files(tmp_path, resp=resp, resp2=resp2))
    # a response replayed for another request: refused (it names its own request) ...
    r = _sign(ca, f["other"], ek_ca, chain, "--response", str(f["resp"]))
    assert r.returncode == 1 and "activation_response_for_another_request" in r.stderr, r.stderr
    # ... and re-labelled for the other request, its secret is not that challenge's
    relabelled = json.loads(resp)
    relabelled["request_sha256"] = json.loads(resp2)["request_sha256"]
    f.update(_files(tmp_path, relabelled=json.dumps(relabelled).encode()))
    r = _sign(ca, f["other"], ek_ca, chain, "--response", str(f["relabelled"]))
    assert r.returncode == 1 and "activation_wrong_secret" in r.stderr, r.stderr
    # the genuine response completes its own request
    r = _sign(ca, f["req"], ek_ca, chain, "--response", str(f["resp"]))
    assert r.returncode == 0, r.stderr
    leaf = x509.load_pem_x509_certificates(chain.read_bytes())[0]
    statement = json.loads(device_attestation(leaf) or b"{}")
    assert statement["evidence"] == "tpm2-activated-ak"
    assert statement["ak_name"] == te.tpm_name(tpm_store.ak_public()).hex()
    # single use: the same response cannot mint a second certificate
    r = _sign(ca, f["req"], ek_ca, tmp_path / "again.pem", "--response", str(f["resp"]))
    assert r.returncode == 1 and "activation_no_challenge" in r.stderr, r.stderr
    print(f"ActivateCredential on swtpm: {activate_ms:.1f} ms")


# -- forging a TPM enrollment on a machine without one ------------------------------------


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _tpmt_public(key: ec.EllipticCurvePublicKey, attrs: int, scheme: int) -> bytes:
    n = key.public_numbers()
    scheme_part = struct.pack(">H", scheme) + (struct.pack(">H", te.ALG_SHA256)
                                               if scheme != te.ALG_NULL else b"")
    return (struct.pack(">HHI", te.ALG_ECC, te.ALG_SHA256, attrs) + _tpm2b(b"")
            + struct.pack(">H", te.ALG_NULL) + scheme_part
            + struct.pack(">HH", te.ECC_NIST_P256, te.ALG_NULL)
            + _tpm2b(n.x.to_bytes(32, "big")) + _tpm2b(n.y.to_bytes(32, "big")))


def _forged_certifier(device: KeyHandle, ek_certificate: bytes) -> Any:
    """A Certifier with no TPM behind it: software AK, hand-made TPMS_ATTEST."""
    ak = ec.generate_private_key(ec.SECP256R1())
    common = te.FIXED_TPM | te.FIXED_PARENT | te.SENSITIVE_DATA_ORIGIN | te.USER_WITH_AUTH
    ak_public = _tpmt_public(ak.public_key(), common | te.RESTRICTED | te.SIGN, te.ALG_ECDSA)
    key_public = _tpmt_public(device.public_key(), common | te.SIGN, te.ALG_NULL)

    def certify(nonce: bytes) -> KeyAttestation:
        name = te.tpm_name(key_public)
        attest = (struct.pack(">IH", te.TPM_GENERATED_VALUE, te.TPM_ST_ATTEST_CERTIFY)
                  + _tpm2b(te.tpm_name(ak_public)) + _tpm2b(nonce)
                  + struct.pack(">QIIB", 123456, 1, 0, 1) + struct.pack(">Q", 0x20191023)
                  + _tpm2b(name) + _tpm2b(name))
        return KeyAttestation(format=FORMAT_TPM2_CERTIFY, key_name="forged", nonce=nonce,
                              attest=attest, signature=ak.sign(attest, ec.ECDSA(hashes.SHA256())),
                              ak_public=ak_public, key_public=key_public,
                              ek_certificate=ek_certificate)

    return certify


def test_forged_request_with_copied_ek_certificate_is_refused(
        tpm_store: TpmKeyStore, swtpm_instance: SwtpmInstance, ca: Path, tmp_path: Path) -> None:
    ek_ca = swtpm_instance.provisioned.issuer_cert
    ek_cert = tpm_store.ek_certificate()  # public: any enrollment request carries it
    assert ek_cert is not None
    soft = MemoryKeyStore().generate("device")
    forged = _request(None, soft, nonce="f-1", certify=_forged_certifier(soft, ek_cert))
    f = _files(tmp_path, forged=forged)
    chain = tmp_path / "chain.pem"
    # The reproduction: this used to come back rc 0 with a CA:TRUE certificate.
    r = _sign(ca, f["forged"], ek_ca, chain)
    assert r.returncode == 1 and "refused: activation_required" in r.stderr, r.stderr
    # Every check but the AK's origin passes, so the CA does challenge it ...
    chal = tmp_path / "chal.json"
    assert _challenge(ca, f["forged"], ek_ca, chal).returncode == 0
    challenge = activation.parse_challenge(chal.read_bytes())
    # ... but the genuine TPM of that EK refuses: its AK is not the forged one,
    with pytest.raises(activation.ActivationRejected) as info:
        activation.activate(challenge, tpm_store, device_id=device_id(soft), now=time.time())
    assert info.value.reason == "wrong_ak"
    with pytest.raises(Exception, match="activation failed"):
        tpm_store.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    # and a guessed secret is refused by the CA.
    guess = {"format": activation.RESPONSE_FORMAT, "request_sha256": challenge.request_sha256,
             "device_id": challenge.device_id, "secret": base64.b64encode(os.urandom(32)).decode()}
    f.update(_files(tmp_path, guess=json.dumps(guess).encode()))
    r = _sign(ca, f["forged"], ek_ca, chain, "--response", str(f["guess"]))
    assert r.returncode == 1 and "activation_wrong_secret" in r.stderr, r.stderr
    assert not chain.exists()


def test_ak_of_a_second_tpm_with_the_first_ek_certificate_is_refused(
        swtpm_provisioned: Any, ca: Path, tmp_path: Path) -> None:
    """A second TPM (new endorsement seed: new EK, new AK) still holding the
    first's EK certificate in NV: its Certify is genuine TPM output, but the
    challenge is wrapped to the certificate's EK, which it does not hold."""
    from tpm2_pytss.constants import ESYS_TR

    base = short_tmpdir("bt2")
    second = SwtpmInstance(base, swtpm_provisioned)
    try:
        second.start()
        ectx = second.esapi()
        ectx.change_eps(ESYS_TR.RH_PLATFORM)
        ectx.close()
        store = TpmKeyStore.from_config(TpmConfig(tcti=second.tcti, key_dir=str(second.key_dir)))
        try:
            dev = store.generate(DEVICE_KEY)
            f = _files(tmp_path, req=_request(store, dev, nonce="s-1"))
            chal = tmp_path / "chal.json"
            r = _challenge(ca, f["req"], swtpm_provisioned.issuer_cert, chal)
            assert r.returncode == 0, r.stderr
            with pytest.raises(activation.ActivationRejected) as info:
                _activate(store, dev, chal)
            assert info.value.reason == "tpm_refused"
            r = _sign(ca, f["req"], swtpm_provisioned.issuer_cert, tmp_path / "c.pem")
            assert r.returncode == 1 and "activation_required" in r.stderr
        finally:
            store.close()
    finally:
        second.stop()
        shutil.rmtree(base, ignore_errors=True)


# -- interoperability with tpm2-tools -----------------------------------------------------

needs_tools = pytest.mark.skipif(shutil.which("tpm2_makecredential") is None,
                                 reason="tpm2-tools not installed")
TOOLS_MAGIC = struct.pack(">II", 0xBADCC0DE, 1)


def _tools(inst: SwtpmInstance, *args: str, cwd: Path) -> str:
    env = dict(os.environ, TPM2TOOLS_TCTI=inst.tcti, TSS2_LOG="all+none")
    out = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 0, f"{args[0]} failed: {out.stderr[-400:]}"
    subprocess.run(["tpm2_flushcontext", "-t"], cwd=cwd, env=env, capture_output=True,
                   timeout=30, check=False)
    return out.stdout


def _ek_key(store: TpmKeyStore) -> rsa.RSAPublicKey:
    key = x509.load_der_x509_certificate(store.ek_certificate() or b"").public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    return key


@needs_tools
def test_tpm2_makecredential_blob_activates_in_our_store(tpm_store: TpmKeyStore,
                                                         tmp_path: Path) -> None:
    """tpm2-tools' MakeCredential (software, -T none) for our AK's Name: the
    store recovers the secret, so our ActivateCredential speaks the TCG format."""
    (tmp_path / "ek.pem").write_bytes(_ek_key(tpm_store).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    secret = os.urandom(32)
    (tmp_path / "secret.bin").write_bytes(secret)
    name = te.tpm_name(tpm_store.ak_public())
    r = subprocess.run(["tpm2_makecredential", "-T", "none", "-G", "rsa", "-u", "ek.pem",
                        "-s", "secret.bin", "-n", name.hex(), "-o", "cred.out"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    blob = (tmp_path / "cred.out").read_bytes()
    assert blob[:8] == TOOLS_MAGIC
    id_len = struct.unpack(">H", blob[8:10])[0]
    id_object, enc_secret = blob[8:10 + id_len], blob[10 + id_len:]
    assert tpm_store.activate_credential(id_object, enc_secret) == secret
    # and a blob made for another Name does not open
    r = subprocess.run(["tpm2_makecredential", "-T", "none", "-G", "rsa", "-u", "ek.pem",
                        "-s", "secret.bin", "-n", ("000b" + "11" * 32), "-o", "bad.out"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)
    bad = (tmp_path / "bad.out").read_bytes()
    bad_len = struct.unpack(">H", bad[8:10])[0]
    with pytest.raises(Exception, match="activation failed"):
        tpm_store.activate_credential(bad[8:10 + bad_len], bad[10 + bad_len:])


@needs_tools
def test_our_challenge_opens_with_tpm2_activatecredential(tpm_store: TpmKeyStore,
                                                          swtpm_instance: SwtpmInstance,
                                                          tmp_path: Path) -> None:
    """Our software MakeCredential (what ``badgectl ca challenge`` sends), for
    an AK that tpm2-tools made under the EK: tpm2_activatecredential on the
    TPM returns our secret."""
    ek_key = _ek_key(tpm_store)
    tpm_store.close()  # the tools talk to the TPM directly now
    d = tmp_path
    _tools(swtpm_instance, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub", cwd=d)
    _tools(swtpm_instance, "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc",
           "-g", "sha256", "-s", "ecdsa", "-n", "ak.name", "-u", "ak.pub", cwd=d)
    ak_name = (d / "ak.name").read_bytes()
    secret = os.urandom(32)
    cred = te.make_credential(ek_key, ak_name, secret)
    (d / "cred.blob").write_bytes(TOOLS_MAGIC + cred.credential_blob + cred.encrypted_secret)
    _tools(swtpm_instance, "tpm2_startauthsession", "--policy-session", "-S", "session.ctx", cwd=d)
    _tools(swtpm_instance, "tpm2_policysecret", "-S", "session.ctx", "-c", "e", cwd=d)
    _tools(swtpm_instance, "tpm2_activatecredential", "-c", "ak.ctx", "-C", "ek.ctx",
           "-i", "cred.blob", "-o", "secret.out", "-P", "session:session.ctx", cwd=d)
    assert (d / "secret.out").read_bytes() == secret


# -- the operator's commands against a TPM daemon ------------------------------------------


@pytest.fixture(scope="module")
def tpm_daemon(swtpm_provisioned: object) -> Iterator[Any]:
    from tests.credentials.conftest import policy
    from tests.e2e.conftest import start_daemon

    base = short_tmpdir("bta")
    os.chmod(base, 0o755)
    state = base / "s"
    state.mkdir(mode=0o755)
    (state / "policy.toml").write_text(policy(os.getuid(), os.getgid()))
    d = start_daemon(state, "--backend", "tpm", timeout=60)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_operator_flow_with_a_tpm_daemon(tpm_daemon: Any, ca: Path, tmp_path: Path) -> None:
    """badgectl enroll → ca challenge → enroll activate (the daemon's TPM, over
    the admin socket) → ca sign --response → enroll import; the agent
    certificate then chains to the root under openssl."""
    from tests.credentials.conftest import AGENT

    env = tpm_daemon.env()
    ek_ca = tpm_daemon.state / "private" / "swtpm" / "ca" / "issuercert.pem"
    req, chal, resp, chain = (tmp_path / n for n in ("req.json", "chal.json", "resp.json",
                                                      "chain.pem"))
    ctl("enroll", "enroll_group", "-o", str(req), env=env)
    r = ctl("ca", "ca_group", "challenge", str(req), "--dir", str(ca), "--ek-ca", str(ek_ca),
            "-o", str(chal), env=env, check=False)
    assert r.returncode == 0, r.stderr
    # a challenge for another device is refused before the TPM is asked
    other = json.loads(chal.read_text())
    other["device_id"] = "someone-else"
    (tmp_path / "other.json").write_text(json.dumps(other))
    r = ctl("enroll", "enroll_group", "activate", str(tmp_path / "other.json"), "-o",
            str(tmp_path / "x.json"), env=env, check=False)
    assert r.returncode != 0 and "wrong_device" in r.stderr, r.stderr
    r = ctl("enroll", "enroll_group", "activate", str(chal), "-o", str(resp), env=env,
            check=False)
    assert r.returncode == 0, r.stderr
    r = ctl("ca", "ca_group", "sign", str(req), "--dir", str(ca), "--ek-ca", str(ek_ca),
            "--response", str(resp), "--agents-from-request", "-o", str(chain), env=env,
            check=False)
    assert r.returncode == 0, r.stderr
    status = json.loads(ctl("enroll", "enroll_group", "import", str(chain), env=env).stdout)
    assert status["enrolled"] and status["attestation"] == "tpm2-activated-ak"
    assert AGENT in status["permitted_agents"] and not status["any_agent"]
    leaf, untrusted = tmp_path / "agent.pem", tmp_path / "untrusted.pem"
    ctl("credentials", "cert_command", "-o", str(leaf), "--chain-out", str(untrusted),
        "--agent", AGENT, env=env)
    ok = subprocess.run(["openssl", "verify", "-CAfile", str(ca / "root.pem"), "-untrusted",
                         str(untrusted), str(leaf)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.slow
def test_online_enrollment_over_the_rpc(tpm_daemon: Any, ca: Path) -> None:
    """`badgectl ca enroll`: the same exchange in one command, over the admin socket."""
    from tests.credentials.conftest import AGENT

    env = tpm_daemon.env()
    ek_ca = tpm_daemon.state / "private" / "swtpm" / "ca" / "issuercert.pem"
    r = ctl("ca", "ca_group", "enroll", "--dir", str(ca), "--agent", AGENT, "--ek-ca", str(ek_ca),
            env=env, check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["attestation"] == "tpm2-activated-ak" and out["permitted_agents"] == [AGENT]
    # without --ek-ca the TPM evidence is refused, not signed as something weaker
    r = ctl("ca", "ca_group", "enroll", "--dir", str(ca), "--agent", AGENT, env=env, check=False)
    assert r.returncode == 1 and "ek_ca_required" in r.stderr, r.stderr


@pytest.mark.slow
def test_tpm_agent_is_advanced_after_activation(tpm_daemon: Any, ca: Path,
                                                tmp_path: Path) -> None:
    """After an activated enrollment the TPM agent's tokens carry `advanced`
    and pass `badgectl verify --min-assurance advanced`."""
    from badgeclient import AdminClient, WorkloadClient
    from tests.credentials.conftest import AGENT

    env = tpm_daemon.env()
    ek_ca = tpm_daemon.state / "private" / "swtpm" / "ca" / "issuercert.pem"
    r = ctl("ca", "ca_group", "enroll", "--dir", str(ca), "--agent", AGENT, "--ek-ca", str(ek_ca),
            env=env, check=False)
    assert r.returncode == 0, r.stderr
    with WorkloadClient(tpm_daemon.workload) as w:
        tok = w.fetch_token(audience="demo", agent=AGENT, scopes=["read"])
        jwks = w.jwks()
        me = w.whoami()
    claims = json.loads(base64.urlsafe_b64decode(tok.token.split(".")[1] + "=="))
    assert claims["assurance"] == "advanced"
    assert {a.agent: a.assurance for a in me.agents}[AGENT] == "advanced"
    with AdminClient(tpm_daemon.admin) as admin:
        assert admin.get_agent(AGENT).assurance == "advanced"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    ok = ctl("verify", "verify_command", "--jwks", str(path), "--audience", "demo",
             "--min-assurance", "advanced", tok.token, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["assurance"] == "advanced"
    who = ctl("main", "cli", "whoami", env=env)
    assert f"{AGENT} (" in who.stdout and "assurance=advanced" in who.stdout


@needs_tools
def test_our_ecc_challenge_opens_with_tpm2_activatecredential(swtpm_instance: SwtpmInstance,
                                                              tmp_path: Path) -> None:
    """The ECC half of MakeCredential (ECDH + KDFe, TCG template L-2) for an
    ECC P-256 EK that tpm2-tools created: tpm2_activatecredential recovers our
    secret. (badged's own devices answer with their RSA EK.)"""
    d = tmp_path
    _tools(swtpm_instance, "tpm2_createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub", cwd=d)
    _tools(swtpm_instance, "tpm2_readpublic", "-c", "ek.ctx", "-f", "pem", "-o", "ek.pem", cwd=d)
    _tools(swtpm_instance, "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc",
           "-g", "sha256", "-s", "ecdsa", "-n", "ak.name", "-u", "ak.pub", cwd=d)
    ek_key = serialization.load_pem_public_key((d / "ek.pem").read_bytes())
    assert isinstance(ek_key, ec.EllipticCurvePublicKey)
    secret = os.urandom(32)
    cred = te.make_credential(ek_key, (d / "ak.name").read_bytes(), secret)
    (d / "cred.blob").write_bytes(TOOLS_MAGIC + cred.credential_blob + cred.encrypted_secret)
    _tools(swtpm_instance, "tpm2_startauthsession", "--policy-session", "-S", "session.ctx", cwd=d)
    _tools(swtpm_instance, "tpm2_policysecret", "-S", "session.ctx", "-c", "e", cwd=d)
    _tools(swtpm_instance, "tpm2_activatecredential", "-c", "ak.ctx", "-C", "ek.ctx",
           "-i", "cred.blob", "-o", "secret.out", "-P", "session:session.ctx", cwd=d)
    assert (d / "secret.out").read_bytes() == secret
