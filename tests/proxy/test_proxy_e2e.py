"""The credential proxy end to end: a real daemon, a real HTTPS upstream with its own
CA, agents as separate processes (and raw sockets for what no client library sends).

Every attack here is performed for real and the test fails if it succeeds: the
upstream's own record of what it received is the judge.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from badgeclient import AdminClient
from badgeclient.client import ApprovalInfo
from tests.e2e.conftest import badgectl_cmd
from tests.proxy.conftest import NOBODY, Agent, ProxyEnv


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _header(rec: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in rec["headers"] if k.lower() == name.lower()]


def raw(env: ProxyEnv, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes to the proxy socket (as this test process, uid of the agent)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(env.socket))
        s.sendall(data)
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buf += chunk
            if b"\r\n\r\n" in buf:
                head, _, body = buf.partition(b"\r\n\r\n")
                length = [int(x.split(b":")[1]) for x in head.split(b"\r\n")
                          if x.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
    status = int(buf.split(b" ", 2)[1]) if buf.startswith(b"HTTP/") else 0
    return status, buf


def get(path: str, host: str = "echo", extra: bytes = b"") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode()
            + extra + b"\r\n")


def test_dpop_route_attaches_a_fresh_proof_and_replaces_what_the_agent_sent(
        proxy_env: ProxyEnv, agent: Agent) -> None:
    env = proxy_env
    env.upstream.clear()
    r = agent.call("echo", "/items/7?q=1", headers={
        "Authorization": "Bearer stolen-by-agent", "DPoP": "forged",
        "Connection": "X-Hop", "X-Hop": "1", "Proxy-Authorization": "Basic eA==",
        "X-HTTP-Method-Override": "DELETE", "X-Original-URL": "/admin",
        "X-Rewrite-URL": "/admin", "X-Trace": "kept"})
    assert r["status"] == 200, r
    r2 = agent.call("echo", "/items/8")
    assert r2["status"] == 200
    first, second = env.upstream.received
    assert first["path"] == "/api/items/7?q=1"
    assert _header(first, "X-Trace") == ["kept"]
    for name in ("X-Hop", "Proxy-Authorization", "Badged-Agent", "X-HTTP-Method-Override",
                 "X-Original-URL", "X-Rewrite-URL"):
        assert not _header(first, name), name
    (authz,) = _header(first, "Authorization")
    assert authz.startswith("DPoP ") and "stolen" not in authz
    token = authz[5:]
    (proof,) = _header(first, "DPoP")
    assert proof != "forged"
    # RFC 9449 §4.3, checked here: key, typ, htm, htu, ath, and cnf.jkt binding.
    head = json.loads(base64.urlsafe_b64decode(proof.split(".")[0] + "=="))
    assert head["typ"] == "dpop+jwt" and head["alg"] == "ES256"
    key = ECKey.import_key(head["jwk"])
    claims = jwt.decode(proof, key).claims
    assert claims["htm"] == "GET"
    assert claims["htu"] == f"https://127.0.0.1:{env.upstream.port}/api/items/7"
    assert claims["ath"] == _b64(hashlib.sha256(token.encode()).digest())
    tok_claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert tok_claims["cnf"]["jkt"] == key.thumbprint()
    assert tok_claims["aud"] == f"https://127.0.0.1:{env.upstream.port}"
    assert tok_claims["sub"].endswith("/agent/demo-agent")
    # A fresh proof per request, the token cached.
    (proof2,) = _header(second, "DPoP")
    assert proof2 != proof
    assert _header(second, "Authorization") == [authz]
    # Nothing of the credential reached the agent: not its answer, environment or memory.
    assert token not in json.dumps(r) and token.encode() not in agent.environ()
    assert not agent.memory_contains(token.encode())
    assert not agent.memory_contains(proof.encode())
    # Audited: allowed (durable before the call) and completed, never the credential.
    done: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10  # written in the background, after the answer
    while time.monotonic() < deadline and len(done) < 2:
        done = [x for x in env.events("proxy.completed") if x["proxy"]["route"] == "echo"
                and x["caller"]["pid"] == agent.pid]
        time.sleep(0.05)
    assert done[-2]["proxy"]["path"] == "/items/7" and done[-2]["proxy"]["status"] == 200
    assert done[-2]["caller"]["pid"] == agent.pid and done[-2]["agent"] == "demo-agent"
    assert done[-2]["proxy"]["bytes_out"] > 0 and "latency_ms" in done[-2]["proxy"]
    allowed = [x for x in env.events("proxy.allowed") if x["proxy"]["route"] == "echo"]
    assert allowed[-2]["proxy"]["attach"]["token_minted"] is True
    assert allowed[-1]["proxy"]["attach"]["token_minted"] is False
    text = "".join(f.read_text() for f in (env.daemon.state / "audit").glob("*.jsonl"))
    assert token not in text and proof not in text
    assert token not in env.daemon.log_text()


@pytest.mark.parametrize("path", [
    "/admin", "/public/../admin", "/public/..%2fadmin", "/public/%2e%2e/admin",
    "/public/%252e%252e/admin", "/public/..%5cadmin", "/items/7/../../admin",
    "/public;x=/../../admin", "/public/%2e%2e%2fadmin", "/public\\..\\admin",
    "http://echo/admin", "//echo/admin", "/public/%c0%ae%c0%ae/admin",
])
def test_disallowed_paths_are_403_audited_and_never_reach_the_upstream(
        proxy_env: ProxyEnv, path: str) -> None:
    env = proxy_env
    env.upstream.clear()
    status, answer = raw(env, get(path))
    assert status == 403, answer
    assert b'"reason"' in answer
    assert env.upstream.received == []
    last = [r for r in env.audit() if r.get("event") == "proxy.denied"][-1]
    assert last["decision"] == "deny" and last["request"]["proxy"]["method"] == "GET"


def test_disallowed_method_is_403(proxy_env: ProxyEnv, agent: Agent) -> None:
    env = proxy_env
    env.upstream.clear()
    r = agent.call("plain", "/anything", method="POST", body="x")
    assert r["status"] == 403
    assert "not allowed" in json.loads(r["body"])["reason"]
    assert env.upstream.received == []
    last = env.events("proxy.denied")[-1]
    assert last["request"]["proxy"] == {"route": "plain", "method": "POST",
                                        "path": "/anything"}


def test_unknown_route_is_403(proxy_env: ProxyEnv) -> None:
    status, _ = raw(proxy_env, get("/x", host="127.0.0.1"))
    assert status == 403


def test_bearer_route_and_rate_budget(proxy_env: ProxyEnv, agent: Agent) -> None:
    env = proxy_env
    env.upstream.clear()
    assert agent.call("plain", "/a")["status"] == 200
    (authz,) = _header(env.upstream.received[0], "Authorization")
    assert authz.startswith("Bearer ")
    claims = json.loads(base64.urlsafe_b64decode(authz[7:].split(".")[1] + "=="))
    assert claims["scope"] == "read" and "cnf" not in claims
    statuses = [agent.call("limited", "/r")["status"] for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert len(env.upstream.received) == 3


def test_redirect_is_returned_not_followed(proxy_env: ProxyEnv, agent: Agent) -> None:
    env = proxy_env
    env.upstream.clear()
    env.other.clear()
    r = agent.call("echo", "/redirect")
    assert r["status"] == 302
    assert r["headers"]["location"] == env.upstream.redirect_to
    assert env.other.received == []  # the other host saw nothing, credential or not


@pytest.mark.parametrize("framing", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
])
def test_smuggling_framings_are_refused(proxy_env: ProxyEnv, framing: bytes) -> None:
    env = proxy_env
    env.upstream.clear()
    data = (b"POST /items HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n" + framing
            + b"\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: echo\r\n\r\n")
    status, _ = raw(env, data)
    assert status in (400, 403, 501), status
    time.sleep(0.2)
    assert env.upstream.received == []


def test_body_above_the_route_limit_is_refused(proxy_env: ProxyEnv, agent: Agent) -> None:
    env = proxy_env
    env.upstream.clear()
    assert agent.call("echo", "/items", method="POST", body="x" * 2000)["status"] == 413
    assert agent.call("echo", "/items", method="POST", body="x" * 10)["status"] == 200
    assert [r["body"] for r in env.upstream.received] == [b"x" * 10]


def test_untrusted_upstream_certificate_is_502(proxy_env: ProxyEnv, agent: Agent) -> None:
    env = proxy_env
    env.upstream.clear()
    r = agent.call("untrusted", "/x")
    assert r["status"] == 502 and "TLS" in json.loads(r["body"])["reason"]
    assert env.upstream.received == []


def test_approval_gates_selected_calls(proxy_env: ProxyEnv, agent: Agent) -> None:
    env = proxy_env
    env.upstream.clear()
    admin = AdminClient(str(env.daemon.admin))
    result: dict[str, Any] = {}

    def call() -> None:
        result.update(agent.call("echo", "/items/9", method="DELETE"))

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 20
    pending: list[ApprovalInfo] = []
    while time.monotonic() < deadline and not pending:
        pending = [a for a in admin.list_approvals() if a.state == "pending"]
        time.sleep(0.1)
    assert pending, "no approval opened"
    assert env.upstream.received == []  # nothing sent while it waits
    (item,) = pending
    assert item.kind == "proxy" and "DELETE" in item.reason and "/items/9" in item.reason
    admin.decide_approval(item.id, approve=True)
    t.join(20)
    assert result["status"] == 200
    assert [r["method"] for r in env.upstream.received] == ["DELETE"]


def test_another_uid_cannot_use_the_route(proxy_env: ProxyEnv) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the agent as nobody")
    env = proxy_env
    env.upstream.clear()
    other = Agent(env, uid=NOBODY)
    try:
        r = other.call("echo", "/items/7")
    finally:
        other.close()
    assert r["status"] == 403
    assert env.upstream.received == []
    last = env.events("proxy.denied")[-1]
    assert last["caller"]["uid"] == NOBODY


def _badgectl(env: ProxyEnv, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(badgectl_cmd(*args), input=stdin, env=env.daemon.env(),
                          capture_output=True, timeout=60, check=False)


def test_static_secret_is_injected_rotated_and_never_readable(
        proxy_env: ProxyEnv, agent: Agent) -> None:
    env = proxy_env
    value1, value2 = "sk-live-" + os.urandom(12).hex(), "sk-live-" + os.urandom(12).hex()
    r = _badgectl(env, "secret", "set", "upstream-key", stdin=value1.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    env.upstream.clear()
    answer = agent.call("keyed", "/v1/things", headers={"X-Api-Key": "agent-made-up",
                                                         "Authorization": "Bearer x"})
    assert answer["status"] == 200, answer
    rec = env.upstream.received[-1]
    assert _header(rec, "X-Api-Key") == [value1]  # replaced, not added to
    assert _header(rec, "Authorization") == []  # an agent's Authorization never passes
    # Rotation takes effect on the very next call.
    assert _badgectl(env, "secret", "rotate", "upstream-key",
                     stdin=value2.encode()).returncode == 0
    assert agent.call("keyed", "/v1/things")["status"] == 200
    assert _header(env.upstream.received[-1], "X-Api-Key") == [value2]
    # Nobody reads it back: not the agent (answer, environment, memory), not
    # badgectl, not the state dir, the audit log or the daemon's log.
    for value in (value1, value2):
        assert value.encode() not in agent.environ()
        assert not agent.memory_contains(value.encode())
        listed = _badgectl(env, "secret", "list", "--json")
        assert listed.returncode == 0 and value.encode() not in listed.stdout
        for f in env.daemon.state.rglob("*"):
            if f.is_file() and not f.name.endswith((".sock",)):
                assert value.encode() not in f.read_bytes(), f
        assert value not in env.daemon.log_text()
    assert json.loads(listed.stdout)[0]["version"] == 2
    events = [r["event"] for r in env.audit() if r.get("event", "").startswith("secret.")]
    assert events[-2:] == ["secret.set", "secret.rotated"]
    # Deleted: the route is refused (and audited) from the next call.
    assert _badgectl(env, "secret", "delete", "upstream-key").returncode == 0
    denied = agent.call("keyed", "/v1/things")
    assert denied["status"] == 403 and "secret" in json.loads(denied["body"])["reason"]
    assert env.events("proxy.denied")[-1]["request"]["proxy"]["route"] == "keyed"


def test_secret_value_is_never_taken_from_argv(proxy_env: ProxyEnv) -> None:
    r = _badgectl(proxy_env, "secret", "set", "from-argv", "sk-in-argv")
    assert r.returncode == 2  # usage error: there is no value argument


def test_curl_recipe_from_the_docs(proxy_env: ProxyEnv) -> None:
    """docs/proxy.md's curl line, as is; the body waits for the decision (100 Continue)."""
    env = proxy_env
    env.upstream.clear()
    base = ["curl", "-sS", "--unix-socket", str(env.socket), "-H", "Badged-Agent: demo-agent",
            "-o", "/dev/null", "-w", "%{http_code}"]
    got = subprocess.run([*base, "http://echo/items/1"], capture_output=True, timeout=30,
                         check=False)
    assert got.stdout == b"200", got.stderr
    posted = subprocess.run([*base, "-H", "Expect: 100-continue", "--data-binary", "x" * 900,
                             "http://echo/items"], capture_output=True, timeout=30, check=False)
    assert posted.stdout == b"200", posted.stderr
    assert [r["body"] for r in env.upstream.received] == [b"", b"x" * 900]


def test_oauth_route_presents_a_client_assertion_and_caches_the_token(
        proxy_env: ProxyEnv, agent: Agent) -> None:
    """A real authlib AS (HTTPS, its own CA) checks badged's RFC 7523 assertion."""
    env = proxy_env
    env.upstream.clear()
    env.auth.token_requests.clear()
    assert agent.call("oauthed", "/x")["status"] == 200
    assert agent.call("oauthed", "/y")["status"] == 200
    (form,) = env.auth.token_requests  # fetched once, then cached
    assert form["grant_type"] == "client_credentials" and form["scope"] == "read"
    assert form["client_id"] == "spiffe://example.org/agent/demo-agent"
    tokens = [_header(r, "Authorization") for r in env.upstream.received]
    issued = list(env.auth.issued)
    assert tokens == [[f"Bearer {issued[-1]}"]] * 2
    allowed = [x for x in env.events("proxy.allowed") if x["proxy"]["route"] == "oauthed"]
    assert [a["proxy"]["attach"]["cached"] for a in allowed[-2:]] == [False, True]
    assert issued[-1] not in json.dumps(env.audit())
    # A client id the AS does not know: refused there, 502, audited, nothing sent.
    env.upstream.clear()
    r = agent.call("oauth-unregistered", "/x")
    assert r["status"] == 502 and env.upstream.received == []
    assert env.events("proxy.denied")[-1]["status"] == 502
    # A client id the policy does not list for this agent: refused before any assertion.
    n = len(env.auth.token_requests)
    assert agent.call("oauth-foreign", "/x")["status"] == 403
    assert len(env.auth.token_requests) == n and env.upstream.received == []


EXEC_AFTER_CONNECT = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
# One answered call first: the daemon has accepted and attested this python
# (an exec before the accept is attributed to the new binary, a documented limit).
s.sendall(b"GET /items/1 HTTP/1.1\r\nHost: echo\r\n\r\n")
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(65536)
head, _, body = buf.partition(b"\r\n\r\n")
length = int([h.split(b":")[1] for h in head.split(b"\r\n")
              if h.lower().startswith(b"content-length")][0])
while len(body) < length:
    body += s.recv(65536)
sys.stdout.buffer.write(head.split(b"\r\n")[0] + b"\n")
sys.stdout.flush()
os.set_inheritable(s.fileno(), True)
# Now the same pid runs sh on the attested connection.
os.execv("/bin/sh", ["sh", "-c", 'printf "GET /items/2 HTTP/1.1\r\nHost: echo\r\n'
                     'Connection: close\r\n\r\n" >&%d; cat <&%d' % (s.fileno(), s.fileno())])
"""


def test_exec_after_connect_loses_the_identity(proxy_env: ProxyEnv) -> None:
    env = proxy_env
    env.upstream.clear()
    out = subprocess.run([sys.executable, "-c", EXEC_AFTER_CONNECT, str(env.socket)],
                         capture_output=True, timeout=30, check=False).stdout
    first, _, second = out.partition(b"\n")
    assert first == b"HTTP/1.1 200 OK"
    assert second.startswith(b"HTTP/1.1 403"), second[:200]
    assert [r["path"] for r in env.upstream.received] == ["/api/items/1"]
    last = env.events("proxy.denied")[-1]
    assert "changed" in last["reason"] or "exec" in last["reason"], last["reason"]


def test_badgectl_proxy_env(proxy_env: ProxyEnv) -> None:
    r = _badgectl(proxy_env, "proxy", "env", "demo-agent", "--proxy-socket",
                  str(proxy_env.socket))
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert f"export BADGED_PROXY_SOCKET={proxy_env.socket}" in text
    assert "export BADGED_AGENT=demo-agent" in text and "curl --unix-socket" in text
    assert "HTTP_PROXY" not in text  # not a forward proxy


def test_badgeclient_proxy_helpers(proxy_env: ProxyEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The docs' httpx and requests recipes (badgeclient.proxy), against the real proxy."""
    from badgeclient.proxy import httpx_client, requests_session

    env = proxy_env
    env.upstream.clear()
    monkeypatch.setenv("BADGED_PROXY_SOCKET", str(env.socket))
    monkeypatch.setenv("BADGED_AGENT", "demo-agent")
    with httpx_client("echo") as client:
        assert client.get("/items/1").status_code == 200
        assert client.post("/items", content=b"hello").status_code == 200
    session = requests_session()
    try:
        assert session.get("http://echo/items/2").status_code == 200
        assert session.post("http://echo/items", data=b"world").status_code == 200
        denied = session.get("http://echo/admin")
        assert denied.status_code == 403 and denied.json()["error"] == "denied"
    finally:
        session.close()
    assert [r["path"] for r in env.upstream.received] == [
        "/api/items/1", "/api/items", "/api/items/2", "/api/items"]
    assert [r["body"] for r in env.upstream.received if r["method"] == "POST"] == [
        b"hello", b"world"]


def test_policy_reload_never_reuses_a_token_minted_for_the_old_route(
        proxy_env: ProxyEnv, agent: Agent) -> None:
    """The token cache is keyed by the whole route: new scopes mean a new token."""
    env = proxy_env
    assert env.auth.httpd is not None
    policy = env.daemon.state / "policy.toml"
    original = policy.read_text()
    env.upstream.clear()
    assert agent.call("plain", "/a")["status"] == 200
    try:
        policy.write_text(original.replace('scopes = ["read"]\n\n[route.limited]',
                                           'scopes = ["write"]\n\n[route.limited]', 1))
        with AdminClient(str(env.daemon.admin)) as a:
            assert a.reload_policy() == (True, "")
        assert agent.call("plain", "/b")["status"] == 200
    finally:
        policy.write_text(original)
        with AdminClient(str(env.daemon.admin)) as a:
            assert a.reload_policy() == (True, "")
    scopes = [json.loads(base64.urlsafe_b64decode(
        _header(r, "Authorization")[0][7:].split(".")[1] + "=="))["scope"]
        for r in env.upstream.received]
    assert scopes == ["read", "write"]


def test_secret_service_is_admin_socket_only(proxy_env: ProxyEnv) -> None:
    """SetSecret/ListSecrets through the workload socket: refused, whoever asks."""
    from badgeclient._cli.secret import SecretClient
    from badgeclient.errors import BadgeError

    with SecretClient(str(proxy_env.daemon.workload)) as client:
        for call in (client.list, lambda: client.set("x", b"v", rotate=False)):
            with pytest.raises(BadgeError) as err:
                call()
            assert err.value.status == "PERMISSION_DENIED"
