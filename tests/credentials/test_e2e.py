"""Attested credentials end to end: a real daemon on SoftHSM, real processes,
and checks by code that is not badged's -- authlib's OAuth server, joserfc,
openssl -- plus badgeclient.verify for the refusals with specific reasons.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws, jwt
from joserfc.jwk import ECKey, KeySet

from badgeclient import AdminClient, InvalidRequestError, PermissionDeniedError, WorkloadClient
from badgeclient.credentials import CredentialClient, EnrollmentClient
from badgeclient.errors import FailedPreconditionError
from badgeclient.verify import (
    ChainError,
    ClaimsError,
    DpopError,
    ReplayError,
    Revocations,
    RevokedError,
    Verifier,
    load_roots,
)
from tests.client.oauth_as import AuthServer, token_endpoint
from tests.credentials.conftest import AGENT, AS_ISSUER, AS_TOKEN, REV_AGENT, RS, ctl
from tests.e2e.conftest import RunningDaemon

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def _segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    h, p, _ = token.split(".")
    return (json.loads(base64.urlsafe_b64decode(h + "==")),
            json.loads(base64.urlsafe_b64decode(p + "==")))


def _jwks(d: RunningDaemon) -> dict[str, Any]:
    with WorkloadClient(d.workload) as w:
        return w.jwks()


# -- RFC 7523 client assertions --------------------------------------------------------


class _InProcessAS(AuthServer):
    """tests/client/oauth_as.py's authlib AS, called in-process at AS_TOKEN (no HTTP here)."""

    @property
    def token_url(self) -> str:
        return AS_TOKEN


def test_authlib_token_endpoint_accepts_assertion_and_refuses_replay(
        cred_daemon: RunningDaemon) -> None:
    state = _InProcessAS(jwks=_jwks(cred_daemon), clients={"oauth-client-1"})
    endpoint = token_endpoint(state)

    def token_request(assertion: str) -> tuple[int, dict[str, Any]]:
        result: tuple[int, dict[str, Any]] = endpoint({
            "grant_type": "client_credentials", "client_assertion": assertion,
            "client_assertion_type": JWTBearerClientAssertion.CLIENT_ASSERTION_TYPE})
        return result

    with CredentialClient(cred_daemon.workload) as c:
        a = c.client_assertion(audience=AS_TOKEN, client_id="oauth-client-1", agent=AGENT)
        other = c.client_assertion(audience="https://as.example.com", client_id="oauth-client-1",
                                   agent=AGENT)
    status, body = token_request(a.assertion)
    assert status == 200 and state.issued[body["access_token"]]["client"] == "oauth-client-1"
    status, body = token_request(a.assertion)
    assert status == 400 and body["error"] == "invalid_client" and "used before" in \
        body["error_description"]
    # an assertion for another audience is refused by the same server
    status, body = token_request(other.assertion)
    assert status == 400 and body["error"] == "invalid_client"
    assert len(state.issued) == 1


def test_assertion_claims_and_independent_verification(cred_daemon: RunningDaemon) -> None:
    jwks = _jwks(cred_daemon)
    with CredentialClient(cred_daemon.workload) as c:
        a = c.client_assertion(audience=AS_TOKEN, agent=AGENT, ttl_seconds=30)
    header, _ = _segments(a.assertion)
    assert header == {"alg": "ES256", "kid": a.key_id, "typ": "client-authentication+jwt"}
    claims = jwt.decode(a.assertion, KeySet.import_key_set(jwks),  # type: ignore[arg-type]
                        algorithms=["ES256"]).claims
    assert claims["iss"] == claims["sub"] == a.client_id == f"spiffe://example.org/agent/{AGENT}"
    assert claims["aud"] == AS_TOKEN and claims["exp"] - claims["iat"] == 30
    assert claims["jti"] == a.jti and a.assertion not in repr(a)
    v = Verifier(jwks=jwks)
    assert v.verify_client_assertion(a.assertion, audience=AS_TOKEN).jti == a.jti
    with pytest.raises(ReplayError):
        v.verify_client_assertion(a.assertion, audience=AS_TOKEN)
    late = Verifier(jwks=jwks, clock=lambda: time.time() + 400)
    with pytest.raises(ClaimsError) as info:
        late.verify_client_assertion(a.assertion, audience=AS_TOKEN)
    assert info.value.reason == "expired"


def test_badgectl_verify_cli(cred_daemon: RunningDaemon, tmp_path: Path) -> None:
    env = cred_daemon.env()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(_jwks(cred_daemon)))
    out = ctl("credentials", "assertion_command", "--audience", AS_TOKEN, "--agent", AGENT,
              env=env).stdout.strip()
    ok = ctl("verify", "verify_command", "--kind", "assertion", "--jwks", str(jwks),
             "--audience", AS_TOKEN, out, env=env)
    assert json.loads(ok.stdout)["agent"] == f"spiffe://example.org/agent/{AGENT}"
    bad = ctl("verify", "verify_command", "--kind", "assertion", "--jwks", str(jwks),
              "--audience", "https://elsewhere", out, env=env, check=False)
    assert bad.returncode == 1 and "wrong_audience" in bad.stderr and out not in bad.stderr
    none = ctl("verify", "verify_command", "--jwks", str(jwks), "--audience", AS_TOKEN,
               "eyJhbGciOiJub25lIn0.e30.", env=env, check=False)
    assert none.returncode == 1 and "alg_none" in none.stderr


# -- DPoP ---------------------------------------------------------------------------------


def test_dpop_proof_passes_joserfc_and_rfc9449_checks(cred_daemon: RunningDaemon) -> None:
    with WorkloadClient(cred_daemon.workload) as w:
        tok = w.fetch_token(audience="demo", agent=AGENT)
    with CredentialClient(cred_daemon.workload) as c:
        p = c.dpop_proof(htm="POST", htu=RS + "/orders?id=7#x", access_token=tok.token,
                         nonce="srv-nonce-1", agent=AGENT)
        p2 = c.dpop_proof(htm="POST", htu=RS + "/orders", agent=AGENT)
    header, _ = _segments(p.proof)
    # RFC 9449 §4.3, checked here with joserfc and hashlib, not badged code:
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256" and "d" not in header["jwk"]
    key = ECKey.import_key(header["jwk"])
    claims = jws.deserialize_compact(p.proof, key, algorithms=["ES256"]).payload
    c9 = json.loads(claims)
    assert c9["htm"] == "POST" and c9["htu"] == RS + "/orders"
    assert abs(c9["iat"] - time.time()) < 120 and c9["jti"] == p.jti
    assert c9["ath"] == base64.urlsafe_b64encode(
        hashlib.sha256(tok.token.encode()).digest()).rstrip(b"=").decode()
    assert c9["nonce"] == "srv-nonce-1"
    assert key.thumbprint() == p.jkt == tok.key_id  # cnf.jkt of tokens bound to this agent
    assert p.jti != p2.jti
    v = Verifier(jwks=_jwks(cred_daemon))
    v.verify_dpop(p.proof, htm="POST", htu=RS + "/orders", access_token=tok.token,
                  nonce="srv-nonce-1", jkt=tok.key_id)
    refusals = [
        (p.proof, {"htm": "POST", "htu": RS + "/orders"}, ReplayError, "replayed"),
        (p2.proof, {"htm": "GET", "htu": RS + "/orders"}, DpopError, "htm_mismatch"),
        (p2.proof, {"htm": "POST", "htu": RS + "/admin"}, DpopError, "htu_mismatch"),
        (p2.proof, {"htm": "POST", "htu": RS + "/orders", "access_token": tok.token},
         DpopError, "ath_mismatch"),
        (p2.proof, {"htm": "POST", "htu": RS + "/orders", "nonce": "n2"}, DpopError,
         "nonce_mismatch"),
    ]
    for proof, kwargs, exc, reason in refusals:
        with pytest.raises(exc) as info:
            v.verify_dpop(proof, **kwargs)
        assert info.value.reason == reason
    skewed = Verifier(jwks=_jwks(cred_daemon), clock=lambda: time.time() + 600)
    with pytest.raises(DpopError) as old:
        skewed.verify_dpop(p2.proof, htm="POST", htu=RS + "/orders")
    assert old.value.reason == "iat_window"


@pytest.mark.parametrize(("kwargs", "exc", "fragment"), [
    ({"htm": "GET", "htu": "ftp://rs.example.com/"}, InvalidRequestError, "http or https"),
    ({"htm": "GE T", "htu": RS}, InvalidRequestError, "htm"),
    ({"htm": "GET", "htu": "https://other.example.com/x"}, PermissionDeniedError, "audience"),
    ({"htm": "GET", "htu": RS, "access_token": "x" * 20000}, InvalidRequestError, "access token"),
    ({"htm": "GET", "htu": RS, "agent": "plain-agent"}, PermissionDeniedError, "not allowed"),
])
def test_dpop_refusals_from_daemon(cred_daemon: RunningDaemon, kwargs: dict[str, Any],
                                   exc: type[Exception], fragment: str) -> None:
    kwargs = {"agent": AGENT, **kwargs}
    with CredentialClient(cred_daemon.workload) as c, pytest.raises(exc) as info:
        c.dpop_proof(**kwargs)
    assert fragment in str(info.value)


def test_assertion_needs_policy_audience_and_kind(cred_daemon: RunningDaemon) -> None:
    with CredentialClient(cred_daemon.workload) as c:
        with pytest.raises(PermissionDeniedError, match="audience"):
            c.client_assertion(audience="https://evil.example/token", agent=AGENT)
        with pytest.raises(PermissionDeniedError, match="not allowed"):
            c.client_assertion(audience="demo", agent="plain-agent")
        with pytest.raises(InvalidRequestError, match="ttl_seconds"):
            c.client_assertion(audience=AS_TOKEN, agent=AGENT, ttl_seconds=3600)


def test_audit_records_jti_and_hash_never_the_credential(cred_daemon: RunningDaemon) -> None:
    with CredentialClient(cred_daemon.workload) as c:
        a = c.client_assertion(audience=AS_TOKEN, agent=AGENT)
        p = c.dpop_proof(htm="GET", htu=RS, agent=AGENT)
        with pytest.raises(PermissionDeniedError):
            c.client_assertion(audience="https://audited-denial.example/token", agent=AGENT)
    text = "".join(f.read_text() for f in sorted((cred_daemon.state / "audit").rglob("*"))
                   if f.is_file() and f.suffix in (".jsonl", ".json", ""))
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    # Repeated refusals of one kind (same uid, rule, reason with the caller's
    # values masked) are written once per window and then counted
    # (service/denials.py): an earlier test's audience refusal may be the one
    # written in full.
    denied = [e for e in events if e.get("event") == "assertion.denied"
              and e.get("agent") == AGENT]
    assert denied and denied[0]["decision"] == "deny"
    assert a.jti in text and p.jti in text
    assert hashlib.sha256(a.assertion.encode()).hexdigest() in text
    assert a.assertion.split(".")[2] not in text and p.proof.split(".")[2] not in text


# -- enrollment, agent certificates, attestation ---------------------------------------------


def _enroll(d: RunningDaemon, ca_dir: Path, tmp: Path) -> Path:
    env = d.env()
    if not (ca_dir / "root.pem").exists():
        ctl("ca", "ca_group", "init", "--dir", str(ca_dir), "--name", "Test Org Root", env=env)
    req = tmp / "device.req.json"
    ctl("enroll", "enroll_group", "-o", str(req), "--nonce", "ca-nonce-1", env=env)
    chain = tmp / "chain.pem"
    signed = ctl("ca", "ca_group", "sign", str(req), "--dir", str(ca_dir), "-o", str(chain),
                 "--trust-domain", "example.org", "--agents-from-request", env=env)
    assert "device" in signed.stdout
    ctl("enroll", "enroll_group", "import", str(chain), env=env)
    return ca_dir / "root.pem"


def _openssl(root: Path, untrusted: Path, leaf: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", *extra, "-CAfile", str(root), "-untrusted",
                           str(untrusted), str(leaf)], capture_output=True, text=True, check=False)


def test_attestation_before_enrollment_verifies_with_device_jwk(cred_daemon: RunningDaemon) -> None:
    with CredentialClient(cred_daemon.workload) as c:
        bundle = c.trust_bundle()
        if bundle.enrolled:
            pytest.skip("daemon already enrolled by an earlier test")
        att = c.client_attestation(audience=AS_ISSUER, client_id="oauth-client-1",
                                   challenge="ch-1", agent=AGENT)
    h, claims = _segments(att.attestation)
    assert h["typ"] == "oauth-client-attestation+jwt" and "x5c" not in h
    assert h["kid"] == bundle.device_jwk["kid"]
    jwt.decode(att.attestation, ECKey.import_key(bundle.device_jwk), algorithms=["ES256"])
    assert claims["hwkey"]["sensitive"] is True and claims["hwkey"]["never_extractable"] is True
    assert claims["hwkey"]["local"] is True and claims["hwkey"]["backend"] == "pkcs11"
    v = Verifier(jwks={"keys": [bundle.device_jwk]})
    r = v.verify_client_attestation(att.attestation, att.pop, audience=AS_ISSUER,
                                    challenge="ch-1")
    assert r.agent == f"spiffe://example.org/agent/{AGENT}"
    assert r.attestation is not None and r.attestation.hwkey["extractable"] is False
    assert r.attestation.key_thumbprint == ECKey.import_key(claims["cnf"]["jwk"]).thumbprint()
    assert r.attestation.key_thumbprint in {k["kid"] for k in _jwks(cred_daemon)["keys"]}
    with pytest.raises(ReplayError):
        v.verify_client_attestation(att.attestation, att.pop, audience=AS_ISSUER)


def test_attestation_verifies_with_the_trust_bundle_key_set(cred_daemon: RunningDaemon,
                                                            tmp_path: Path) -> None:
    """`badgectl verify --kind attestation --jwks <(badgectl trust-bundle --jwks)`:
    the device key signs attestations, and `badgectl jwks` (agent token keys) is
    not the set to trust for them."""
    env = cred_daemon.env()
    with CredentialClient(cred_daemon.workload) as c:
        att = c.client_attestation(audience=AS_ISSUER, client_id="oauth-client-1", agent=AGENT)
    device_set, agent_set = tmp_path / "device.jwks", tmp_path / "agents.jwks"
    device_set.write_text(ctl("credentials", "trust_bundle_command", "--jwks", env=env).stdout)
    agent_set.write_text(json.dumps(_jwks(cred_daemon)))
    args = ("--kind", "attestation", "--audience", AS_ISSUER, "--pop", att.pop, att.attestation)
    ok = ctl("verify", "verify_command", "--jwks", str(device_set), *args, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["agent"] == f"spiffe://example.org/agent/{AGENT}"
    wrong = ctl("verify", "verify_command", "--jwks", str(agent_set), *args, env=env, check=False)
    assert wrong.returncode == 1 and "unknown_kid" in wrong.stderr


def test_enrollment_chain_openssl_and_revocation(cred_daemon: RunningDaemon, ca_dir: Path,
                                                 tmp_path: Path) -> None:
    env = cred_daemon.env()
    with CredentialClient(cred_daemon.workload) as c:
        assert not c.trust_bundle().enrolled
        with pytest.raises(FailedPreconditionError, match="not enrolled"):
            c.agent_certificate(agent=AGENT)
    root = _enroll(cred_daemon, ca_dir, tmp_path)
    with EnrollmentClient(cred_daemon.admin) as e:
        status = e.status()
    assert status.enrolled and status.spiffe_id.startswith("spiffe://example.org/device/")
    # agent certificates for two agents, with the org root as the only anchor
    leaf, untrusted = tmp_path / "agent.pem", tmp_path / "untrusted.pem"
    out = ctl("credentials", "cert_command", "-o", str(leaf), "--chain-out", str(untrusted),
              "--agent", REV_AGENT, env=env)
    first = json.loads(out.stdout)
    ok = _openssl(root, untrusted, leaf)
    assert ok.returncode == 0, ok.stderr
    cert = x509.load_pem_x509_certificate(leaf.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://example.org/agent/{REV_AGENT}"]
    assert cert.not_valid_after_utc.timestamp() - time.time() <= 3600
    # asked again: the same certificate (more than half its life left)
    again = json.loads(ctl("credentials", "cert_command", "-o", str(tmp_path / "a2.pem"),
                           "--agent", REV_AGENT, env=env).stdout)
    assert again["serial"] == first["serial"]
    # a wrong root is not an anchor
    other_ca = tmp_path / "other-ca"
    ctl("ca", "ca_group", "init", "--dir", str(other_ca), env=env)
    assert _openssl(other_ca / "root.pem", untrusted, leaf).returncode != 0

    # an assertion carrying the agent chain verifies with only the org root
    with CredentialClient(cred_daemon.workload) as c:
        xa = c.client_assertion(audience=AS_TOKEN, agent=REV_AGENT, include_x5c=True)
    roots = load_roots(root.read_bytes())
    r = Verifier(roots=roots).verify_client_assertion(xa.assertion, audience=AS_TOKEN)
    assert r.agent == f"spiffe://example.org/agent/{REV_AGENT}" and len(r.chain) == 2

    # revoke: no new certificate, and the published CRL revokes the old one
    with AdminClient(cred_daemon.admin) as admin:
        admin.revoke_agent(REV_AGENT, "e2e")
    with CredentialClient(cred_daemon.workload) as c:
        with pytest.raises(PermissionDeniedError, match="revoked"):
            c.agent_certificate(agent=REV_AGENT)
        bundle = c.trust_bundle()
    crl = tmp_path / "crl.pem"
    crl.write_text(bundle.crl_pem)
    revoked = _openssl(root, untrusted, leaf, "-crl_check", "-CRLfile", str(crl))
    assert revoked.returncode != 0 and "revoked" in revoked.stderr
    device_cert = load_roots(untrusted.read_bytes())[0]
    revs = Revocations.from_crl(crl.read_bytes(), device_cert, now=time.time())
    assert int(first["serial"], 16) in revs.serials
    with pytest.raises(RevokedError) as info:
        Verifier(roots=roots, revocations=revs).verify_client_assertion(xa.assertion,
                                                                        audience=AS_TOKEN)
    assert info.value.reason == "revoked"
    # the agent that was not revoked still verifies under the same CRL
    good = tmp_path / "good.pem"
    ctl("credentials", "cert_command", "-o", str(good), "--agent", AGENT, env=env)
    assert _openssl(root, untrusted, good, "-crl_check", "-CRLfile", str(crl)).returncode == 0
    # rotation supersedes the old key's certificate; the new key gets a new one
    with AdminClient(cred_daemon.admin) as admin:
        admin.rotate_agent(AGENT)
    with CredentialClient(cred_daemon.workload) as c:
        crl.write_text(c.trust_bundle().crl_pem)
        renewed = c.agent_certificate(agent=AGENT)
    superseded = _openssl(root, untrusted, good, "-crl_check", "-CRLfile", str(crl))
    assert superseded.returncode != 0 and "revoked" in superseded.stderr
    fresh = tmp_path / "fresh.pem"
    fresh.write_text(renewed.certificate_pem)
    assert _openssl(root, untrusted, fresh, "-crl_check", "-CRLfile", str(crl)).returncode == 0


def test_attestation_after_enrollment_chains_to_root(cred_daemon: RunningDaemon, ca_dir: Path,
                                                     tmp_path: Path) -> None:
    with CredentialClient(cred_daemon.workload) as c:
        if not c.trust_bundle().enrolled:
            _enroll(cred_daemon, ca_dir, tmp_path)
        att = c.client_attestation(audience=AS_ISSUER, client_id="oauth-client-1", agent=AGENT)
        bundle = c.trust_bundle()
    h, _ = _segments(att.attestation)
    assert len(h["x5c"]) == 1
    roots = load_roots((ca_dir / "root.pem").read_bytes())
    r = Verifier(roots=roots).verify_client_attestation(att.attestation, att.pop,
                                                        audience=AS_ISSUER)
    assert r.issuer == f"spiffe://example.org/device/{bundle.device_id}" and r.chain
    with pytest.raises(ChainError) as info:
        Verifier(roots=roots, clock=lambda: time.time() + 400 * 86400).verify_client_attestation(
            att.attestation, att.pop, audience=AS_ISSUER)
    assert info.value.reason == "chain_expired"


def test_csr_carries_evidence_that_matches_its_key(cred_daemon: RunningDaemon,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "agent.csr"
    ctl("credentials", "csr_command", "-o", str(out), "--agent", AGENT, env=cred_daemon.env())
    r = subprocess.run(["openssl", "req", "-in", str(out), "-verify", "-noout"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0
    csr = x509.load_pem_x509_csr(out.read_bytes())
    ext = next(e for e in csr.extensions if isinstance(e.value, x509.UnrecognizedExtension))
    evidence = ext.value.value.decode()
    with CredentialClient(cred_daemon.workload) as c:
        device_jwk = c.trust_bundle().device_jwk
    # Once enrolled the evidence header carries the device chain (x5c), larger
    # than joserfc's default 512-byte header limit: a relying party raises it.
    registry = jws.JWSRegistry(algorithms=["ES256"])
    registry.max_header_length = 8192
    claims = jwt.decode(evidence, ECKey.import_key(device_jwk), algorithms=["ES256"],
                        registry=registry).claims
    csr_key = csr.public_key()
    assert isinstance(csr_key, ec.EllipticCurvePublicKey)
    assert ECKey.import_key(claims["cnf"]["jwk"]).thumbprint() == ECKey.import_key(
        csr_key.public_bytes(serialization.Encoding.PEM,
                             serialization.PublicFormat.SubjectPublicKeyInfo)).thumbprint()
    assert claims["sub"] == f"spiffe://example.org/agent/{AGENT}"
    assert claims["hwkey"]["never_extractable"] is True


def test_ca_refuses_forged_requests_and_daemon_refuses_foreign_chains(
        cred_daemon: RunningDaemon, ca_dir: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes

    env = cred_daemon.env()
    if not (ca_dir / "root.pem").exists():
        ctl("ca", "ca_group", "init", "--dir", str(ca_dir), env=env)
    with EnrollmentClient(cred_daemon.admin) as e:
        doc = json.loads(e.request())
    real_csr = x509.load_pem_x509_csr(doc["csr"].encode())
    evidence_ext = next(x for x in real_csr.extensions
                        if isinstance(x.value, x509.UnrecognizedExtension))
    # a CSR for another key, carrying the device's (genuine) evidence
    other = ec.generate_private_key(ec.SECP256R1())
    forged = (x509.CertificateSigningRequestBuilder().subject_name(real_csr.subject)
              .add_extension(real_csr.extensions.get_extension_for_class(
                  x509.SubjectAlternativeName).value, critical=False)
              .add_extension(evidence_ext.value, critical=False)
              .sign(other, hashes.SHA256()))
    cases = {
        "evidence_bad_signature": {**doc, "csr": forged.public_bytes(
            serialization.Encoding.PEM).decode()},
        "no_evidence": {**doc, "csr": x509.CertificateSigningRequestBuilder().subject_name(
            real_csr.subject).sign(other, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM).decode()},
        "malformed": {**doc, "format": "something-else"},
    }
    for reason, body in cases.items():
        req = tmp_path / f"{reason}.json"
        req.write_text(json.dumps(body))
        r = ctl("ca", "ca_group", "sign", str(req), "--dir", str(ca_dir), "-o",
                str(tmp_path / "x.pem"), "--agent", AGENT, env=env, check=False)
        assert r.returncode == 1 and f"refused: {reason}" in r.stderr, (reason, r.stderr)
    wrong_td = tmp_path / "ok.json"
    wrong_td.write_text(json.dumps(doc))
    r = ctl("ca", "ca_group", "sign", str(wrong_td), "--dir", str(ca_dir), "-o",
            str(tmp_path / "x.pem"), "--trust-domain", "other.org", "--agent", AGENT, env=env,
            check=False)
    assert r.returncode == 1 and "trust_domain" in r.stderr
    # the daemon refuses a chain issued for another key
    other_chain = tmp_path / "other-chain.pem"
    stolen = {**doc, "csr": doc["csr"]}
    ok = tmp_path / "ok2.json"
    ok.write_text(json.dumps(stolen))
    ctl("ca", "ca_group", "sign", str(ok), "--dir", str(ca_dir), "-o", str(other_chain),
        "--agents-from-request", env=env)
    real_chain = other_chain.read_text()
    root_pem = (ca_dir / "root.pem").read_text()
    with EnrollmentClient(cred_daemon.admin) as e:
        with pytest.raises(InvalidRequestError, match="key_mismatch"):
            e.import_chain(root_pem)  # the root: a CA cert, but not for the device key
        with pytest.raises(InvalidRequestError, match="PEM"):
            e.import_chain("not a certificate")
        assert e.import_chain(real_chain).enrolled


def test_enrollment_is_admin_only(cred_daemon: RunningDaemon) -> None:
    with EnrollmentClient(cred_daemon.workload) as e, pytest.raises(PermissionDeniedError) as info:
        e.status()
    assert "admin socket" in str(info.value)
    with EnrollmentClient(cred_daemon.workload) as e, pytest.raises(PermissionDeniedError):
        e.activate("{}")
    # a PKCS#11 device has no TPM to activate with: refused, nothing attempted
    with EnrollmentClient(cred_daemon.admin) as e, \
            pytest.raises(FailedPreconditionError, match="no TPM"):
        e.activate("{}")


def test_cli_dpop_reads_token_from_stdin_and_attestation_json(cred_daemon: RunningDaemon) -> None:
    env = cred_daemon.env()
    with WorkloadClient(cred_daemon.workload) as w:
        tok = w.fetch_token(audience="demo", agent=AGENT)
    out = ctl("credentials", "dpop_command", "--htm", "GET", "--htu", RS + "/x",
              "--access-token-file", "-", "--agent", AGENT, "--json", env=env,
              input=tok.token + "\n")
    doc = json.loads(out.stdout)
    _, claims = _segments(doc["proof"])
    assert claims["ath"] == base64.urlsafe_b64encode(
        hashlib.sha256(tok.token.encode()).digest()).rstrip(b"=").decode()
    assert doc["jkt"] == tok.key_id and tok.token not in out.stderr
    att = json.loads(ctl("credentials", "attestation_command", "--audience", AS_ISSUER,
                         "--challenge", "c-9", "--agent", AGENT, env=env).stdout)
    assert _segments(att["client_attestation_pop"])[1]["challenge"] == "c-9"
    bundle = json.loads(ctl("credentials", "trust_bundle_command", env=env).stdout)
    assert bundle["device_jwk"]["kid"] == _segments(att["client_attestation"])[0]["kid"]


def _verify_at(env: dict[str, str], token: str, jwks: dict[str, Any], tmp: Path,
               level: str) -> subprocess.CompletedProcess[str]:
    path = tmp / f"jwks-{level}.json"
    path.write_text(json.dumps(jwks))
    return ctl("verify", "verify_command", "--jwks", str(path), "--audience", "demo",
               "--min-assurance", level, token, env=env, check=False)


def test_assurance_of_a_softhsm_agent(cred_daemon: RunningDaemon, ca_dir: Path,
                                      tmp_path: Path) -> None:
    """A PKCS#11 agent on an enrolled device is `enterprise`: its token's own
    statement is not verified hardware attestation, so `--min-assurance
    advanced` refuses its tokens; an agent outside the enrollment is `foundation`."""
    env = cred_daemon.env()
    with CredentialClient(cred_daemon.workload) as c:
        if not c.trust_bundle().enrolled:
            _enroll(cred_daemon, ca_dir, tmp_path)
    with WorkloadClient(cred_daemon.workload) as w:
        tok = w.fetch_token(audience="demo", agent=AGENT, scopes=["read"])
        jwks = w.jwks()
        me = w.whoami()
    assert _segments(tok.token)[1]["assurance"] == "enterprise"
    assert {a.agent: a.assurance for a in me.agents}[AGENT] == "enterprise"
    with AdminClient(cred_daemon.admin) as admin:
        assert admin.get_agent(AGENT).assurance == "enterprise"
    refused = _verify_at(env, tok.token, jwks, tmp_path, "advanced")
    assert refused.returncode == 1 and "assurance_too_low" in refused.stderr, refused.stderr
    ok = _verify_at(env, tok.token, jwks, tmp_path, "enterprise")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["assurance"] == "enterprise"
    shown = ctl("main", "cli", "agent", "show", AGENT, env=env)
    assert "assurance enterprise" in shown.stdout
