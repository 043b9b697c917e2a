"""The workload path end to end: real daemon, real SoftHSM, real processes.

Tokens are verified with joserfc (an independent JOSE implementation)
against the JWKS the daemon publishes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import KeySet

from badgeclient import (
    AdminClient,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    WorkloadClient,
)
from tests.e2e.conftest import RunningDaemon, badgectl_cmd

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]
HERE = Path(__file__).parent


def verify(token: str, jwks: dict[str, object]) -> dict[str, object]:
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])  # type: ignore[arg-type]
    claims: dict[str, object] = dict(decoded.claims)
    jwt.JWTClaimsRegistry(aud={"essential": True}, exp={"essential": True}).validate(claims)
    return claims


def test_token_verifies_against_jwks(daemon: RunningDaemon) -> None:
    with WorkloadClient(daemon.workload) as c:
        tok = c.fetch_token(audience="demo", scopes=["read"])
        claims = verify(tok.token, c.jwks())
    assert claims["sub"] == "spiffe://example.org/agent/demo-agent"
    assert claims["iss"] == "spiffe://example.org/badged"
    assert claims["aud"] == "demo" and claims["scope"] == "read"
    assert claims["exp"] - claims["iat"] == 300  # type: ignore[operator]
    assert claims["nbf"] == claims["iat"] and claims["jti"] == tok.jti
    assert tok.token not in repr(tok)


def test_badgectl_token_json_verifies_with_badgectl_jwks(daemon: RunningDaemon) -> None:
    """The independent check from the issue: CLI output + stock JOSE library."""
    out = subprocess.run(badgectl_cmd("token", "--audience", "https://api.example.com",
                                      "--scope", "read", "--scope", "write", "--ttl", "120",
                                      "--json"),
                         env=daemon.env(), capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    jwks = json.loads(subprocess.run(badgectl_cmd("jwks"), env=daemon.env(), capture_output=True,
                                     text=True, check=True).stdout)
    claims = verify(doc["token"], jwks)
    header = json.loads(base64.urlsafe_b64decode(doc["token"].split(".")[0] + "=="))
    assert header["alg"] == "ES256" and header["typ"] == "JWT" and header["kid"] == doc["kid"]
    assert claims["scope"] == "read write"
    assert claims["exp"] - claims["iat"] == 120  # type: ignore[operator]


@pytest.mark.parametrize(("kwargs", "exc", "fragment"), [
    ({"audience": "https://evil.example"}, PermissionDeniedError, "audience not allowed"),
    ({"audience": "demo", "ttl_seconds": 7200}, PermissionDeniedError, "ttl above"),
    ({"audience": "demo", "scopes": ["admin"]}, PermissionDeniedError, "scope not allowed"),
    ({"audience": "demo", "agent": "someone-else"}, PermissionDeniedError, "denied by policy"),
    ({"audience": ""}, InvalidRequestError, "audience is required"),
    ({"audience": "demo", "scopes": ["has space"]}, InvalidRequestError, "scope"),
    ({"audience": "demo", "ttl_seconds": 10**6}, InvalidRequestError, "ttl_seconds"),
    ({"audience": "demo", "agent": "Bad Name!"}, InvalidRequestError, "agent names"),
    ({"audience": "x" * 600}, InvalidRequestError, "audience must be"),
])
def test_refusals_have_status_and_short_reason(daemon: RunningDaemon, kwargs: dict[str, object],
                                               exc: type[Exception], fragment: str) -> None:
    with WorkloadClient(daemon.workload) as c, pytest.raises(exc) as info:
        c.fetch_token(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    # ... and the daemon keeps serving.
    with WorkloadClient(daemon.workload) as c:
        assert c.fetch_token(audience="demo").agent == "demo-agent"


def test_oversized_request_is_resource_exhausted(daemon: RunningDaemon) -> None:
    with WorkloadClient(daemon.workload) as c:
        with pytest.raises(RateLimitedError):
            c.sign(b"x" * (200 * 1024))
        with pytest.raises(InvalidRequestError):
            c.sign(b"x" * (64 * 1024 + 1))
        assert c.fetch_token(audience="demo").jti


def test_daemon_listens_only_on_its_two_public_sockets(daemon: RunningDaemon) -> None:
    """No private gRPC socket exists that a same-uid process could dial around the front.

    The front terminates HTTP/2 itself, so the identity of every call comes
    from the connection it arrived on. Checked from the kernel's view: every
    listening Unix socket held by the daemon is one of the two public paths.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{daemon.proc.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = []
    with open("/proc/net/unix") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            # Flags 00010000 = __SO_ACCEPTCON (listening); field 6 is the inode.
            if parts[6] in inodes and int(parts[3], 16) & 0x10000:
                listening.append(parts[7] if len(parts) > 7 else "<unnamed>")
    # The kernel shows the name bound before the atomic rename into place.
    listening = [re.sub(r"/\.([^/]+)\.\d+$", r"/\1", name) for name in listening]
    # badged dev also serves the SSH agent socket ([ssh] socket, issue 19).
    ssh_agent = daemon.state / "run" / "ssh-agent.sock"
    # ... and the credential proxy's socket ([proxy] socket, issue 20).
    proxy = daemon.state / "run" / "proxy.sock"
    assert sorted(listening) == sorted([str(daemon.workload), str(daemon.admin), str(ssh_agent),
                                        str(proxy)])
    assert not (daemon.state / "private" / "grpc.sock").exists()


def test_workload_socket_cannot_reach_admin_methods(daemon: RunningDaemon) -> None:
    with AdminClient(daemon.workload) as a, pytest.raises(PermissionDeniedError) as info:
        a.list_agents()
    assert "admin socket" in str(info.value)


def test_socket_modes(daemon: RunningDaemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.workload).st_mode) == 0o666
    assert stat.S_IMODE(os.stat(daemon.admin).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.workload.parent).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(daemon.state / "private" / "agents.json").st_mode) == 0o600


def test_sign_uses_separate_key_and_cannot_forge_tokens(daemon: RunningDaemon) -> None:
    with WorkloadClient(daemon.workload) as c:
        jwks = c.jwks()
        real = c.fetch_token(audience="demo")
        header, _, _ = real.token.partition(".")
        payload = base64.urlsafe_b64encode(json.dumps({
            "iss": "spiffe://example.org/badged", "sub": "spiffe://example.org/agent/demo-agent",
            "aud": "https://bank.example", "exp": 4_000_000_000, "iat": 1, "jti": "forged",
        }).encode()).rstrip(b"=").decode()
        signing_input = f"{header}.{payload}".encode()
        sig = c.sign(signing_input)
    # The Sign key is not the token key and is not in the JWKS...
    assert sig.key_id not in {k["kid"] for k in jwks["keys"]}
    assert sig.key_id != real.key_id
    # ...and the signature covers a prefixed message, valid only as such.
    pub = serialization.load_pem_public_key(sig.public_key_pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig.signature, sig.signed_message, ec.ECDSA(hashes.SHA256()))
    assert sig.signed_message.endswith(signing_input) and sig.signed_message != signing_input
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(sig.signature)
    forged = f"{header}.{payload}." + base64.urlsafe_b64encode(
        r.to_bytes(32, "big") + s.to_bytes(32, "big")).rstrip(b"=").decode()
    with pytest.raises(BadSignatureError):
        verify(forged, jwks)
    # Even a verifier that wrongly trusted the sign key would reject it.
    sign_jwk: dict[str, object] = {"keys": [{**json.loads(_jwk_of(pub)), "kid": real.key_id}]}
    with pytest.raises(BadSignatureError):
        verify(forged, sign_jwk)


def _jwk_of(pub: ec.EllipticCurvePublicKey) -> str:
    from badged.core.jose import ec_public_jwk

    return json.dumps(ec_public_jwk(pub))


def test_whoami_explains(daemon: RunningDaemon) -> None:
    with WorkloadClient(daemon.workload) as c:
        me = c.whoami()
    assert me.uid == os.getuid() and me.pid == os.getpid()
    assert me.exe == os.path.realpath(sys.executable)
    assert [a.agent for a in me.agents] == ["demo-agent"]
    assert me.agents[0].rule.startswith("policy.toml:")
    assert f"unix:uid:{os.getuid()}" in me.selectors


def test_health_service(daemon: RunningDaemon) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{daemon.workload}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        svc = health_pb2.HealthCheckRequest(service="badged.v1.WorkloadService")
        assert stub.Check(svc, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Watch is server-streaming and written through context.write():
        # the first message is the current status; the deadline ends it.
        watch = stub.Watch(svc, timeout=2)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(watch)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
def test_second_user_gets_nothing(daemon: RunningDaemon) -> None:
    nobody = 65534
    env = dict(daemon.env())
    run = [sys.executable, str(HERE / "as_user.py"), str(nobody)]

    def as_nobody(*args: str) -> dict[str, object]:
        proc = subprocess.run([*run, *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, object] = json.loads(proc.stdout)
        return result

    tok = as_nobody("token", str(daemon.workload), "demo")
    assert tok["ok"] is False and tok["status"] == "PERMISSION_DENIED"
    assert tok["code"] == "policy_denied"
    who = as_nobody("whoami", str(daemon.workload))
    assert who == {"ok": True, "uid": nobody, "agents": []}
    adm = as_nobody("admin", str(daemon.admin))
    assert adm["ok"] is False and adm["status"] == "UNAVAILABLE"  # EACCES on the 0600 socket


def test_2000_concurrent_tokens_from_16_processes(daemon: RunningDaemon) -> None:
    with WorkloadClient(daemon.workload) as c:
        c.fetch_token(audience="demo")  # warm up before measuring memory
    rss_before = daemon.rss_kb()
    procs = [subprocess.Popen([sys.executable, str(HERE / "load_client.py"), str(daemon.workload),
                               "125"], env=daemon.env(), stdout=subprocess.PIPE, text=True)
             for _ in range(16)]
    jtis: list[str] = []
    errors: list[str] = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        doc = json.loads(out)
        jtis += doc["jtis"]
        errors += doc["errors"]
    assert not errors, errors[:5]
    assert len(jtis) == 2000 and len(set(jtis)) == 2000
    growth = daemon.rss_kb() - rss_before
    assert growth < 20_000, f"daemon RSS grew {growth} kB over 2000 requests"
    # Every credential a client received has its record on disk already.
    exported = subprocess.run(badgectl_cmd("audit", "export", "--dir", str(daemon.state / "audit")),
                              capture_output=True, text=True, check=True).stdout
    logged = {json.loads(line).get("jti") for line in exported.splitlines() if line.strip()}
    assert set(jtis) <= logged


def test_no_secret_reaches_the_log_or_the_audit(daemon: RunningDaemon) -> None:
    """Tokens, signatures and the PIN never appear in the daemon's log or audit files."""
    with WorkloadClient(daemon.workload) as c:
        tok = c.fetch_token(audience="demo", scopes=["read"])
        sig = c.sign(b"secret-looking payload", context="t")
        with pytest.raises(PermissionDeniedError):
            c.fetch_token(audience="https://nope.example")
    pin = (daemon.state / "private" / "softhsm" / "user.pin").read_text().strip()
    texts = [daemon.log_text()] + [p.read_text(errors="replace")
                                   for p in (daemon.state / "audit").glob("*.jsonl")]
    assert texts[1:], "audit files expected"
    for text in texts:
        assert tok.token not in text and tok.token.split(".")[2] not in text
        assert base64.b64encode(sig.signature).decode() not in text
        assert pin not in text
    assert any(tok.jti in t for t in texts[1:])  # ...but the jti is recorded
