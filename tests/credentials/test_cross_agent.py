"""Issue 13 §1 and §5, performed for real: an identity cannot be borrowed.

A real ``badged dev`` (SoftHSM, real sockets) with two agents: ``deploy-bot``
bound to the test's own uid (root) and ``low-agent`` bound to ``nobody``.
The attacks run in a separate process that drops to ``nobody`` before it
connects, so the daemon sees a real low-privilege peer
(``tests/credentials/as_agent.py``). Each test fails if the attack yields a
credential, or if a verifier accepts what it must refuse.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from badgeclient import AdminClient, WorkloadClient
from badgeclient.credentials import CredentialClient
from badgeclient.verify import (
    AlgorithmError,
    DpopError,
    DpopRequest,
    UntrustedKeyError,
    VerificationError,
    Verifier,
)
from tests.conftest import short_tmpdir
from tests.credentials.conftest import AS_ISSUER, AS_TOKEN, RS
from tests.e2e.conftest import RunningDaemon, badgectl_cmd, softhsm_available, start_daemon

__all__ = ["softhsm_available"]

pytestmark = [pytest.mark.softhsm, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as nobody")]

HERE = Path(__file__).parent
NOBODY = 65534
TD = "example.org"
VICTIM = "deploy-bot"
LOW = "low-agent"
VICTIM_ID = f"spiffe://{TD}/agent/{VICTIM}"
LOW_ID = f"spiffe://{TD}/agent/{LOW}"
LOW_CLIENT = "low-oauth-client"      # listed for LOW in the policy
VICTIM_CLIENT = "deploy-oauth-client"  # listed for VICTIM only
ISSUER = f"spiffe://{TD}/badged"


def _policy() -> str:
    return f"""
[bundle.creds]
audiences = ["{AS_TOKEN}", "{AS_ISSUER}", "{RS}", "demo"]
scopes = ["read"]
kinds = ["token", "sign", "assertion", "dpop", "csr"]
max_ttl = "1h"

[[agent]]
name = "{VICTIM}"
selectors = ["unix:uid:{os.getuid()}"]
bundles = ["creds"]
client_ids = ["{VICTIM_CLIENT}"]

[[agent]]
name = "{LOW}"
selectors = ["unix:uid:{NOBODY}"]
bundles = ["creds"]
client_ids = ["{LOW_CLIENT}"]
"""


@pytest.fixture(scope="module")
def xd(softhsm_available: None) -> Iterator[RunningDaemon]:
    base = short_tmpdir("bxa")
    os.chmod(base, 0o755)  # like /run: nobody must reach the workload socket
    state = base / "s"
    state.mkdir(mode=0o755)
    (state / "policy.toml").write_text(_policy())
    d = start_daemon(state)
    try:
        with AdminClient(d.admin) as admin:
            for name in (VICTIM, LOW):
                admin.create_agent(name, "cross-agent attack tests")
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(d: RunningDaemon, op: str, *args: str, uid: int = NOBODY) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(HERE / "as_agent.py"), str(uid), str(d.workload),
                           op, *args], env=d.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _jwks(d: RunningDaemon) -> dict[str, Any]:
    with WorkloadClient(d.workload) as w:
        return w.jwks()


def _audit(d: RunningDaemon) -> list[dict[str, Any]]:
    from badged.audit import tail

    return list(tail(d.state / "audit", 500))


def _claims(token: str) -> dict[str, Any]:
    seg = token.split(".")[1]
    doc: dict[str, Any] = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
    return doc


def _denied(out: dict[str, Any]) -> None:
    assert out["ok"] is False, f"attack yielded a credential: {out}"
    assert out["status"] == "PERMISSION_DENIED" and out["code"] == "policy_denied", out


# -- §1: an assertion's client_id / an attestation's sub is the caller's own -------------


FOREIGN_IDS = (VICTIM_ID, VICTIM_CLIENT, "spiffe://other.org/agent/x", "any-client-at-all")


def _client_id_denials(d: RunningDaemon, event: str) -> list[dict[str, Any]]:
    return [r for r in _audit(d) if r.get("event") == event and r.get("agent") == LOW
            and r.get("decision") == "deny" and (r.get("caller") or {}).get("uid") == NOBODY
            and "client_id" in str(r.get("reason"))]


def test_nobody_cannot_get_an_assertion_for_another_client_id(xd: RunningDaemon) -> None:
    for client_id in FOREIGN_IDS:
        out = as_nobody(xd, "assertion", AS_TOKEN, client_id)
        _denied(out)
        assert "client_id" in out["message"], out
    # Audited: the first refusal in full (later ones of the same kind in the
    # same minute are counted, service/denials.py).
    denial = _client_id_denials(xd, "assertion.denied")
    assert denial, "the refusal is not in the audit log"
    assert denial[0]["request"]["client_id"] in FOREIGN_IDS


def test_nobody_cannot_get_an_attestation_for_another_sub(xd: RunningDaemon) -> None:
    out = as_nobody(xd, "attestation", AS_ISSUER, VICTIM_ID)
    _denied(out)
    denial = _client_id_denials(xd, "attestation.denied")
    assert denial and denial[0]["request"]["client_id"] == VICTIM_ID


def test_own_and_policy_listed_client_ids_are_allowed(xd: RunningDaemon) -> None:
    own = as_nobody(xd, "assertion", AS_TOKEN, "")
    assert own["ok"], own
    assert _claims(own["credential"])["sub"] == LOW_ID == own["client_id"]
    listed = as_nobody(xd, "assertion", AS_TOKEN, LOW_CLIENT)
    assert listed["ok"], listed
    claims = _claims(listed["credential"])
    assert claims["iss"] == claims["sub"] == LOW_CLIENT
    r = Verifier(jwks=_jwks(xd)).verify_client_assertion(listed["credential"], audience=AS_TOKEN,
                                                         client_id=LOW_CLIENT)
    assert r.agent == LOW_ID  # the agent is the signing key's, whatever the client id
    att = as_nobody(xd, "attestation", AS_ISSUER, LOW_CLIENT)
    assert att["ok"], att
    assert _claims(att["credential"])["sub"] == LOW_CLIENT
    assert _claims(att["credential"])["agent"] == LOW_ID


def test_jwks_names_each_keys_agent_and_the_issuer(xd: RunningDaemon) -> None:
    doc = _jwks(xd)
    assert doc["badged_issuer"] == ISSUER
    named = {k["badged_agent"] for k in doc["keys"]}
    assert {VICTIM_ID, LOW_ID} <= named


# -- §3: verifiers accept an access token only, signed by the agent it names ----------


def _validate_svid(d: RunningDaemon, token: str, audience: str) -> tuple[bool, str]:
    """The daemon's own SPIFFE ValidateJWTSVID, over raw gRPC with py-spiffe's
    stubs (the same proto package as badged's: one of them per process)."""
    pytest.importorskip("spiffe")
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    with grpc.insecure_channel(f"unix:{d.workload}") as ch:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)  # type: ignore[no-untyped-call]
        try:
            r = stub.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(
                audience=audience, svid=token), metadata=(("workload.spiffe.io", "true"),),
                timeout=10)
        except grpc.RpcError as exc:
            return False, str(exc.details())
        return True, r.spiffe_id


def _badgectl_verify(d: RunningDaemon, token: str, audience: str, *extra: str
                     ) -> subprocess.CompletedProcess[str]:
    jwks = d.state.parent / "jwks.json"
    jwks.write_text(json.dumps(_jwks(d)))
    return subprocess.run(badgectl_cmd("verify", "--jwks", str(jwks), "--audience", audience,
                                       *extra, "-"),
                          input=token, env=d.env(), capture_output=True, text=True, timeout=60)


def _example(d: RunningDaemon, token: str, audience: str) -> subprocess.CompletedProcess[str]:
    """clients/examples/verify_token.py: a relying party on joserfc, not badged code."""
    pytest.importorskip("joserfc")
    base = d.state.parent
    (base / "jwks.json").write_text(json.dumps(_jwks(d)))
    (base / "token.json").write_text(json.dumps({"token": token}))
    example = HERE.parent.parent / "clients" / "examples" / "verify_token.py"
    return subprocess.run([sys.executable, str(example), str(base / "token.json"),
                           str(base / "jwks.json"), audience],
                          env=d.env(), capture_output=True, text=True, timeout=60)


def test_an_assertion_is_not_an_access_token_anywhere(xd: RunningDaemon) -> None:
    # The attack of issue 13 §1 with the caller's *own* client id: sub is the
    # agent's SPIFFE ID, aud a resource server, signed by the agent's key.
    out = as_nobody(xd, "assertion", "demo", "")
    if not out["ok"]:  # "demo" is allowed for assertions in this policy
        pytest.fail(f"could not get an assertion: {out}")
    assertion = out["credential"]
    with pytest.raises(AlgorithmError) as info:
        Verifier(jwks=_jwks(xd)).verify_token(assertion, audience="demo")
    assert info.value.reason == "wrong_typ"
    cli = _badgectl_verify(xd, assertion, "demo")
    assert cli.returncode == 1 and "wrong_typ" in cli.stderr, cli
    ok, why = _validate_svid(xd, assertion, "demo")
    assert not ok and "typ" in why, why
    example = _example(xd, assertion, "demo")
    assert example.returncode == 1 and "typ" in example.stderr, example
    # The attestation PoP (signed by the same agent key) is no token either.
    att = as_nobody(xd, "attestation", "demo", "")
    assert att["ok"], att
    for cred in (att["pop"], att["credential"]):
        with pytest.raises(VerificationError):
            Verifier(jwks=_jwks(xd)).verify_token(cred, audience="demo")
        assert not _validate_svid(xd, cred, "demo")[0]
    # ...while a real token of the same agent passes all three.
    tok = as_nobody(xd, "token", "demo")
    assert tok["ok"], tok
    assert Verifier(jwks=_jwks(xd)).verify_token(tok["credential"], audience="demo").agent == LOW_ID
    assert _badgectl_verify(xd, tok["credential"], "demo").returncode == 0
    assert _validate_svid(xd, tok["credential"], "demo") == (True, LOW_ID)
    assert _example(xd, tok["credential"], "demo").returncode == 0


_FORGE = r"""
import json, os, sys
state, key_name, header, claims = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
os.environ["SOFTHSM2_CONF"] = f"{state}/private/softhsm/softhsm2.conf"
from pathlib import Path
from badged.core.jose import encode_jws
from badged.core.tokens import ES256
from badged.keystore.pkcs11.store import Pkcs11Config, Pkcs11KeyStore
from badged.softhsm import SoftHsmToken, find_module
tok = SoftHsmToken(Path(os.environ["SOFTHSM2_CONF"]), find_module(), "badged-dev",
                   Path(f"{state}/private/softhsm/user.pin"))
store = Pkcs11KeyStore.from_config(Pkcs11Config(uri=tok.uri(), module_path=tok.module_path))
key = store.get(key_name)
print(encode_jws(header, claims, lambda data: key.sign(data, ES256)))
store.close()
"""


def _forge(d: RunningDaemon, signer: str, claims: dict[str, Any], typ: str = "JWT") -> str:
    """A token signed by ``signer``'s *real* hardware token key (what a
    compromised signer, or the pre-fix assertion path, could produce)."""
    kid = next(k["kid"] for k in _jwks(d)["keys"]
               if k["badged_agent"] == f"spiffe://{TD}/agent/{signer}")
    header = {"alg": "ES256", "kid": kid, "typ": typ}
    out = subprocess.run([sys.executable, "-c", _FORGE, str(d.state),
                          f"badged/agent/{signer}/v1/tok", json.dumps(header), json.dumps(claims)],
                         env=d.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _token_claims(sub: str, jti: str, act: str | None = None) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {"iss": ISSUER, "sub": sub, "aud": "demo", "iat": now, "nbf": now,
                         "exp": now + 120, "jti": jti}
    if act is not None:
        c["act"] = {"sub": act}
    return c


def test_a_key_cannot_speak_for_another_agent(xd: RunningDaemon) -> None:
    control = _forge(xd, LOW, _token_claims(LOW_ID, "ctl-1"))
    # The forging path itself is sound: the same key naming its own agent passes.
    assert Verifier(jwks=_jwks(xd)).verify_token(control, audience="demo").agent == LOW_ID
    assert _validate_svid(xd, control, "demo") == (True, LOW_ID)
    for i, claims in enumerate([
        _token_claims(VICTIM_ID, "x-1"),                                    # sub = the victim
        _token_claims(f"spiffe://{TD}/user/root", "x-2", act=VICTIM_ID),     # act.sub = the victim
    ]):
        forged = _forge(xd, LOW, claims)
        with pytest.raises(UntrustedKeyError) as info:
            Verifier(jwks=_jwks(xd)).verify_token(forged, audience="demo")
        assert info.value.reason == "key_agent_mismatch", i
        cli = _badgectl_verify(xd, forged, "demo")
        assert cli.returncode == 1 and "key_agent_mismatch" in cli.stderr, cli
        ok, why = _validate_svid(xd, forged, "demo")
        assert not ok and "another agent" in why, why
        example = _example(xd, forged, "demo")
        assert example.returncode == 1 and "another agent" in example.stderr, example


def test_an_assertion_for_another_agent_is_refused_by_verifiers(xd: RunningDaemon) -> None:
    """What the pre-fix daemon minted (issue 13 §1): iss = sub = deploy-bot's
    SPIFFE ID under low-agent's key. A relying party must refuse it too."""
    now = int(time.time())
    claims = {"iss": VICTIM_ID, "sub": VICTIM_ID, "aud": AS_TOKEN, "iat": now, "nbf": now,
              "exp": now + 60, "jti": "fa-1"}
    forged = _forge(xd, LOW, claims, typ="client-authentication+jwt")
    with pytest.raises(UntrustedKeyError) as info:
        Verifier(jwks=_jwks(xd)).verify_client_assertion(forged, audience=AS_TOKEN,
                                                         client_id=VICTIM_ID)
    assert info.value.reason == "key_agent_mismatch"
    cli = _badgectl_verify(xd, forged, AS_TOKEN, "--kind", "assertion", "--client-id", VICTIM_ID)
    assert cli.returncode == 1 and "key_agent_mismatch" in cli.stderr, cli
    # Control: the same forging path naming low-agent itself is accepted.
    own = _forge(xd, LOW, {**claims, "iss": LOW_ID, "sub": LOW_ID, "jti": "fa-2"},
                 typ="client-authentication+jwt")
    assert Verifier(jwks=_jwks(xd)).verify_client_assertion(own, audience=AS_TOKEN).agent == LOW_ID


def test_issuer_is_required(xd: RunningDaemon) -> None:
    tok = _forge(xd, LOW, {**_token_claims(LOW_ID, "iss-1"), "iss": "https://evil.example"})
    with pytest.raises(VerificationError) as info:
        Verifier(jwks=_jwks(xd)).verify_token(tok, audience="demo")
    assert info.value.reason == "wrong_issuer"
    assert not _validate_svid(xd, tok, "demo")[0]
    bare = {"keys": _jwks(xd)["keys"]}  # a JWKS without the issuer: must be told
    with pytest.raises(VerificationError) as unknown:
        Verifier(jwks=bare).verify_token(_forge(xd, LOW, _token_claims(LOW_ID, "iss-2")),
                                         audience="demo")
    assert unknown.value.reason == "issuer_unknown"


# -- §5: DPoP proofs need bound tokens; --require-dpop --------------------------------


def test_dpop_proof_with_an_unbound_token_is_refused(xd: RunningDaemon) -> None:
    htu = f"{RS}/x"
    with WorkloadClient(xd.workload) as w, CredentialClient(xd.workload) as c:
        bearer = w.fetch_token(audience=RS).token
        proof = c.dpop_proof(htm="GET", htu=htu, access_token=bearer).proof
    with pytest.raises(DpopError) as info:
        Verifier(jwks=_jwks(xd)).verify_token(bearer, audience=RS,
                                              dpop=DpopRequest(proof, "GET", htu))
    assert info.value.reason == "token_not_bound"
    cli = _badgectl_verify(xd, bearer, RS, "--dpop", proof, "--htm", "GET", "--htu", htu)
    assert cli.returncode == 1 and "token_not_bound" in cli.stderr, cli
    required = _badgectl_verify(xd, bearer, RS, "--require-dpop")
    assert required.returncode == 1 and "token_not_bound" in required.stderr, required
    # Control: without --require-dpop the same bearer token verifies.
    assert _badgectl_verify(xd, bearer, RS).returncode == 0


# -- §5: whoami tells a non-operator only about itself --------------------------------


def test_whoami_shows_nobody_nothing_about_other_agents(xd: RunningDaemon) -> None:
    me = as_nobody(xd, "whoami")
    assert me["ok"] and me["agents"] == [LOW]
    text = json.dumps(me)
    assert VICTIM not in text and f"uid:{os.getuid()}" not in text, text
    assert me["misses"] == []
    # A uid bound to nothing learns that, and nothing about anyone else.
    stranger = as_nobody(xd, "whoami", uid=65533)
    assert stranger["ok"] and stranger["agents"] == []
    text = json.dumps(stranger)
    assert VICTIM not in text and LOW not in text and "missing selectors" not in text, text
    # The operator (root) still gets the full map for debugging.
    with WorkloadClient(xd.workload) as w:
        full = w.whoami()
    assert any(m["agent"] == LOW and "missing selectors" in m["reason"] for m in full.misses)
