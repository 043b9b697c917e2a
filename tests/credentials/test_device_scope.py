"""A device vouches only for its own agents, and revoking it takes them along.

Device certificates come from the real CA (``badgectl ca sign`` in its own
process, SoftHSM key); agent certificates are then minted the way a
compromised device would mint them -- with its own device key, for any name
it likes. The relying parties are the openssl CLI (``openssl verify``, with
``-crl_check_all`` for revocation) and badgeclient's Verifier.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from badgeclient.verify import ChainError, Revocations, RevokedError, Verifier
from badged.core import assertions
from badged.core import x509 as bx
from badged.core.jose import ec_public_jwk, encode_jws, jwk_thumbprint
from badged.core.tokens import build_claims
from badged.enroll.agentca import AgentCertificateAuthority
from badged.enroll.device import enrollment_request
from badged.enroll.store import EnrollmentStore
from badged.errors import FailedPreconditionError
from badged.identity.registry import SigningKey
from badged.keystore.memory import MemoryKeyStore
from badged.keystore.port import KeyHandle, KeyProperties
from tests.conftest import short_tmpdir
from tests.credentials.conftest import ctl

TD = "example.org"
AUD = "https://api.example.com"
GOOD = KeyProperties(backend="pkcs11", sensitive=True, extractable=False, never_extractable=True,
                     local=True, extra={"token": "pkcs11:token=t"})
ES256 = ec.ECDSA(hashes.SHA256())


@dataclass
class Device:
    key: KeyHandle
    chain: list[x509.Certificate]
    chain_pem: Path


@dataclass
class Org:
    ca: Path
    root: x509.Certificate
    a: Device
    b: Device
    keys: MemoryKeyStore
    tmp: Path


def _enroll(ca: Path, tmp: Path, keys: MemoryKeyStore, name: str, agent: str) -> Device:
    key = keys.generate(f"device-{name}")
    doc = enrollment_request(device_key=key, props=GOOD, trust_domain=TD, now=time.time(),
                             nonce=name, agents=["alice", "bob", "carol"])
    req = tmp / f"{name}.req.json"
    req.write_text(json.dumps(doc))
    out = tmp / f"{name}.chain.pem"
    r = ctl("ca", "ca_group", "sign", str(req), "--dir", str(ca), "-o", str(out),
            "--agent", agent, check=False)
    assert r.returncode == 0, r.stderr
    return Device(key, x509.load_pem_x509_certificates(out.read_bytes()), out)


@pytest.fixture(scope="module")
def org(softhsm_available: None) -> Iterator[Org]:
    base = short_tmpdir("bds")
    ca = base / "ca"
    ctl("ca", "ca_group", "init", "--dir", str(ca))
    keys = MemoryKeyStore()
    try:
        a = _enroll(ca, base, keys, "a", "alice")
        b = _enroll(ca, base, keys, "b", "bob")
        yield Org(ca, x509.load_pem_x509_certificate((ca / "root.pem").read_bytes()), a, b,
                  keys, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _mint(dev: Device, agent_key: KeyHandle, *, cn: str, uri: str) -> x509.Certificate:
    """What a compromised device can do: sign any agent certificate it likes."""
    if cn == uri.rsplit("/", 1)[-1]:
        return bx.agent_certificate(device_key=dev.key, device_cert=dev.chain[0], now=time.time(),
                                    request=bx.AgentCertRequest(uri, cn, agent_key.public_key(),
                                                                x509.random_serial_number(), 600))
    leaf = bx.agent_certificate(device_key=dev.key, device_cert=dev.chain[0], now=time.time(),
                                request=bx.AgentCertRequest(uri, cn, agent_key.public_key(),
                                                            x509.random_serial_number(), 600))
    # keep the subject, swap the SAN: the builder would not do it, a forger would
    builder = (x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(leaf.issuer)
               .public_key(agent_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(leaf.not_valid_before_utc).not_valid_after(leaf.not_valid_after_utc))
    for ext in leaf.extensions:
        if isinstance(ext.value, x509.SubjectAlternativeName):
            continue
        builder = builder.add_extension(ext.value, ext.critical)
    builder = builder.add_extension(x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(uri)]), critical=False)
    return builder.sign(bx.HandlePrivateKey(dev.key), hashes.SHA256())


def _openssl(org: Org, dev: Device, leaf: x509.Certificate, *extra: str
             ) -> subprocess.CompletedProcess[str]:
    path = org.tmp / f"leaf-{leaf.serial_number:x}.pem"
    path.write_text(bx.to_pem(leaf))
    untrusted = org.tmp / "untrusted.pem"
    untrusted.write_text(bx.to_pem(dev.chain[0]))
    return subprocess.run(["openssl", "verify", *extra, "-CAfile", str(org.ca / "root.pem"),
                           "-untrusted", str(untrusted), str(path)],
                          capture_output=True, text=True, check=False)


def _x5c(*certs: x509.Certificate) -> list[str]:
    return [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in certs]


def _token(agent_key: KeyHandle, leaf: x509.Certificate, dev: Device, sub: str, jti: str) -> str:
    now = time.time()
    claims = build_claims(issuer=f"spiffe://{TD}/badged", subject=sub, audience=AUD, scopes=(),
                          ttl_seconds=120, now=now, jti=jti)
    return encode_jws({"alg": "ES256", "typ": "JWT", "x5c": _x5c(leaf, dev.chain[0])}, claims,
                      lambda d: agent_key.sign(d, ES256))


def test_device_a_cannot_vouch_for_device_b_agent(org: Org) -> None:
    agent_key = org.keys.generate("agent-key")
    alice = _mint(org.a, agent_key, cn="alice", uri=f"spiffe://{TD}/agent/alice")
    bob_by_a = _mint(org.a, agent_key, cn="bob", uri=f"spiffe://{TD}/agent/bob")
    bob_by_b = _mint(org.b, agent_key, cn="bob", uri=f"spiffe://{TD}/agent/bob")
    assert bx.permitted_agents(org.a.chain[0]) == frozenset({"alice"})
    # openssl: A's own agent passes, B's agent minted by A is refused
    ok = _openssl(org, org.a, alice)
    assert ok.returncode == 0, ok.stderr
    refused = _openssl(org, org.a, bob_by_a)
    assert refused.returncode != 0 and "permitted subtree violation" in refused.stderr, \
        refused.stderr
    assert _openssl(org, org.b, bob_by_b).returncode == 0
    # the Verifier: the same rule on the SPIFFE ID, and the subject must be the SAN's agent
    v = Verifier(roots=[org.root], issuer=f"spiffe://{TD}/badged")
    assert v.verify_token(_token(agent_key, alice, org.a, f"spiffe://{TD}/agent/alice", "t1"),
                          audience=AUD).agent == f"spiffe://{TD}/agent/alice"
    assert v.verify_token(_token(agent_key, bob_by_b, org.b, f"spiffe://{TD}/agent/bob", "t2"),
                          audience=AUD).agent == f"spiffe://{TD}/agent/bob"
    with pytest.raises(ChainError) as info:
        v.verify_token(_token(agent_key, bob_by_a, org.a, f"spiffe://{TD}/agent/bob", "t3"),
                       audience=AUD)
    assert info.value.reason == "device_scope"
    # subject alice (passes openssl's subject check), SAN bob: the Verifier refuses it
    smuggled = _mint(org.a, agent_key, cn="alice", uri=f"spiffe://{TD}/agent/bob")
    # (openssl matches URI constraints on the host only, so it checks the subject and
    # not the SPIFFE path: a relying party on plain openssl must read the subject CN;
    # docs/credentials.md "Who can mint what")
    assert _openssl(org, org.a, smuggled).returncode == 0
    with pytest.raises(ChainError) as smuggle:
        v.verify_token(_token(agent_key, smuggled, org.a, f"spiffe://{TD}/agent/bob", "t4"),
                       audience=AUD)
    assert smuggle.value.reason == "device_scope"


def test_device_attests_only_for_its_agents(org: Org) -> None:
    agent_key = org.keys.generate("attested-key")
    dev_id = jwk_thumbprint(ec_public_jwk(org.a.key.public_key()))

    def attestation(agent: str, jti: str) -> tuple[str, str]:
        now = time.time()
        att = assertions.mint_client_attestation(assertions.client_attestation_claims(
            attester=f"spiffe://{TD}/device/{dev_id}", client_id="c",
            agent_key=agent_key.public_key(), now=now, ttl_seconds=600,
            evidence={"agent": agent}), org.a.key, x5c=_x5c(org.a.chain[0]))
        pop = assertions.mint_attestation_pop(assertions.attestation_pop_claims(
            client_id="c", audience="https://as", now=now, ttl_seconds=60, jti=jti), agent_key)
        return att, pop

    v = Verifier(roots=[org.root], issuer=f"spiffe://{TD}/badged")
    assert v.verify_client_attestation(*attestation(f"spiffe://{TD}/agent/alice", "p1"),
                                       audience="https://as").agent.endswith("/alice")
    with pytest.raises(ChainError) as info:
        v.verify_client_attestation(*attestation(f"spiffe://{TD}/agent/bob", "p2"),
                                    audience="https://as")
    assert info.value.reason == "device_scope"


def test_daemon_ca_refuses_agents_outside_its_enrollment(org: Org, tmp_path: Path) -> None:
    """The device's own agent CA does not mint what relying parties would refuse."""
    store = EnrollmentStore(tmp_path)
    ca = AgentCertificateAuthority(store, device_key=org.a.key)
    handle = org.keys.generate("carol-key")

    def key(agent: str) -> SigningKey:
        return SigningKey(agent=agent, spiffe_id=f"spiffe://{TD}/agent/{agent}", kid="k",
                          version=1, handle=handle)

    assert ca.issue(key("alice"), org.a.chain, time.time()).agent == "alice"
    with pytest.raises(FailedPreconditionError, match="not among the agents"):
        ca.issue(key("carol"), org.a.chain, time.time())


def test_ca_requires_named_agents(org: Org) -> None:
    key = org.keys.generate("device-c")
    doc = enrollment_request(device_key=key, props=GOOD, trust_domain=TD, now=time.time())
    req = org.tmp / "c.req.json"
    req.write_text(json.dumps(doc))
    r = ctl("ca", "ca_group", "sign", str(req), "--dir", str(org.ca), "-o",
            str(org.tmp / "c.pem"), check=False)
    assert r.returncode == 2 and "--agent" in r.stderr
    r = ctl("ca", "ca_group", "sign", str(req), "--dir", str(org.ca), "-o",
            str(org.tmp / "c.pem"), "--agent", "Not A Name", check=False)
    assert r.returncode == 1


def test_revoked_device_takes_its_agents_with_it(org: Org) -> None:
    agent_key = org.keys.generate("rev-agent-key")
    alice = _mint(org.a, agent_key, cn="alice", uri=f"spiffe://{TD}/agent/alice")
    bob = _mint(org.b, agent_key, cn="bob", uri=f"spiffe://{TD}/agent/bob")
    r = ctl("ca", "ca_group", "revoke", "--dir", str(org.ca), "--cert", str(org.a.chain_pem),
            check=False)
    assert r.returncode == 0, r.stderr
    root_crl = org.tmp / "root.crl.pem"
    r = ctl("ca", "ca_group", "crl", "--dir", str(org.ca), "-o", str(root_crl), check=False)
    assert r.returncode == 0, r.stderr
    crl = x509.load_pem_x509_crl(root_crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(org.a.chain[0].serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(org.b.chain[0].serial_number) is None

    def device_crl(dev: Device) -> Path:
        path = org.tmp / f"dev-{dev.chain[0].serial_number:x}.crl.pem"
        path.write_text(bx.to_pem(bx.agent_crl(device_key=dev.key, device_cert=dev.chain[0],
                                               revoked=[], now=time.time(),
                                               next_update_seconds=600, number=1)))
        return path

    # openssl with every CRL of the path: A's agents fall with A, B's stand
    revoked = _openssl(org, org.a, alice, "-crl_check_all", "-CRLfile", str(root_crl),
                       "-CRLfile", str(device_crl(org.a)))
    assert revoked.returncode != 0 and "revoked" in revoked.stderr, revoked.stderr
    fine = _openssl(org, org.b, bob, "-crl_check_all", "-CRLfile", str(root_crl),
                    "-CRLfile", str(device_crl(org.b)))
    assert fine.returncode == 0, fine.stderr
    # the Verifier with the CA's CRL
    revs = Revocations.from_crl(root_crl.read_bytes(), org.root, now=time.time())
    v = Verifier(roots=[org.root], revocations=revs, issuer=f"spiffe://{TD}/badged")
    with pytest.raises(RevokedError):
        v.verify_token(_token(agent_key, alice, org.a, f"spiffe://{TD}/agent/alice", "r1"),
                       audience=AUD)
    assert v.verify_token(_token(agent_key, bob, org.b, f"spiffe://{TD}/agent/bob", "r2"),
                          audience=AUD).agent.endswith("/bob")
    # and `badgectl verify` with the CA's CRL (its issuer is the root)
    args = ["--root", str(org.ca / "root.pem"), "--crl", str(root_crl), "--device-chain",
            str(org.ca / "root.pem"), "--issuer", f"spiffe://{TD}/badged", "--audience", AUD]
    r = ctl("verify", "verify_command", *args,
            _token(agent_key, alice, org.a, f"spiffe://{TD}/agent/alice", "r3"), check=False)
    assert r.returncode == 1 and "revoked" in r.stderr, r.stderr
    r = ctl("verify", "verify_command", *args,
            _token(agent_key, bob, org.b, f"spiffe://{TD}/agent/bob", "r4"), check=False)
    assert r.returncode == 0, r.stderr


def test_name_constraints_are_the_agent_subjects() -> None:
    """The constraint base and the agent subject are one encoding (openssl's
    prefix match is then exact), and an alien constraint permits nothing."""
    nc = bx.agent_name_constraints(["bob", "alice", "bob"])
    assert [s.value for s in nc.permitted_subtrees or ()] == [bx.agent_subject("alice"),
                                                            bx.agent_subject("bob")]
    keys = MemoryKeyStore()
    ca, dev = keys.generate("ca"), keys.generate("dev")
    now = time.time()
    root = bx.root_certificate(ca, name="R", now=now, days=1, serial=1)
    alien = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")]))
             .issuer_name(root.subject).public_key(dev.public_key()).serial_number(2)
             .not_valid_before(root.not_valid_before_utc).not_valid_after(root.not_valid_after_utc)
             .add_extension(x509.NameConstraints(permitted_subtrees=[x509.DNSName("x.org")],
                                                 excluded_subtrees=None), critical=False)
             .sign(bx.HandlePrivateKey(ca), hashes.SHA256()))
    assert bx.permitted_agents(alien) == frozenset()
    plain = bx.device_certificate(ca_key=ca, ca_cert=root, device_public=dev.public_key(),
                                  device_id="d", trust_domain=TD, now=now, days=1, serial=3)
    assert bx.permitted_agents(plain) is None


def test_relative_ca_dir_works_from_anywhere(softhsm_available: None, tmp_path: Path) -> None:
    """`ca init --dir rel` then `ca sign --dir ../rel` from another directory:
    the CA's token configuration must not depend on the cwd that created it."""
    import os
    import sys

    def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        code = ("from badgeclient._cli.ca import ca_group as c; "
                "c.main(prog_name='badgectl', standalone_mode=True)")
        return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=dict(os.environ),
                              capture_output=True, text=True, check=False, timeout=60)

    assert run(tmp_path, "init", "--dir", "rel-ca").returncode == 0
    key = MemoryKeyStore().generate("device-rel")
    doc = enrollment_request(device_key=key, props=GOOD, trust_domain=TD, now=time.time())
    (tmp_path / "req.json").write_text(json.dumps(doc))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run(elsewhere, "sign", "../req.json", "--dir", "../rel-ca", "-o", "chain.pem",
            "--agent", "alice")
    assert r.returncode == 0, r.stderr
    assert x509.load_pem_x509_certificates((elsewhere / "chain.pem").read_bytes())
