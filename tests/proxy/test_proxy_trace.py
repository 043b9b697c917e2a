"""Issue 21 through the credential proxy: each downstream call joins the
caller's trace and its issuance's transaction id, so `badgectl audit trace`
shows the call made with the credential."""

from __future__ import annotations

import json
import os
import subprocess

from badgeclient import AdminClient
from tests.e2e.conftest import badgectl_cmd
from tests.proxy.conftest import POLICY, ProxyEnv
from tests.proxy.test_proxy_e2e import get, raw

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def test_downstream_calls_are_in_the_trace(proxy_env: ProxyEnv) -> None:
    status, _ = raw(proxy_env, get("/traced", host="plain",
                                   extra=f"traceparent: {TRACEPARENT}\r\n".encode()))
    assert status == 200
    # An invalid traceparent is ignored (W3C Trace Context), the call still goes through.
    status, _ = raw(proxy_env, get("/untraced", host="plain", extra=b"traceparent: junk\r\n"))
    assert status == 200
    r = subprocess.run(badgectl_cmd("audit", "trace", TRACE_ID, "--json", "--dir",
                                    str(proxy_env.daemon.state / "audit")),
                       env=proxy_env.daemon.env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in r.stdout.splitlines()]
    events = [x["event"] for x in records]
    assert events == ["proxy.allowed", "proxy.completed"], events
    assert records[0]["txn"] == records[1]["txn"] and records[0]["traceparent"] == TRACEPARENT
    assert records[1]["proxy"]["path"] == "/traced"


DEPLOY_BUNDLE = """
[bundle.deploy]
kinds = ["proxy"]
context = { channel = ["#deploy"] }
[[bundle.deploy.proxy]]
route = "plain"
methods = ["POST"]
paths = ["/**"]
"""


def _post(path: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: plain\r\nContent-Length: 0\r\n"
            f"Connection: close\r\n{extra}\r\n").encode()


def test_context_scoped_bundle_through_the_proxy(proxy_env: ProxyEnv) -> None:
    """A bundle scoped to #deploy allows the call only with that context; the
    Badged-Context header is consumed by the proxy, never sent upstream."""
    env = proxy_env
    assert env.auth.httpd is not None
    policy = (POLICY.format(port=env.upstream.port, ca=env.ca, uid=os.getuid(),
                            as_port=env.auth.httpd.server_address[1])
              .replace('bundles = ["calls", "gated"]', 'bundles = ["calls", "gated", "deploy"]')
              + DEPLOY_BUNDLE)
    (env.daemon.state / "policy.toml").write_text(policy)
    with AdminClient(env.daemon.admin) as a:
        assert a.reload_policy() == (True, "")
    env.upstream.clear()
    status, _ = raw(env, _post("/release", "Badged-Context: channel=#deploy, task=REL-7\r\n"))
    assert status == 200
    assert env.upstream.received and not any(
        k.lower() == "badged-context" for k, _ in env.upstream.received[0]["headers"])
    for extra in ("Badged-Context: channel=#dev\r\n", ""):
        status, _ = raw(env, _post("/release", extra))
        assert status == 403, extra
    status, body = raw(env, _post("/release", "Badged-Context: repo=x\r\n"))
    assert status == 400 and b"unknown key" in body
    assert len(env.upstream.received) == 1
    allowed = [r for r in env.events("proxy.allowed") if r.get("context")]
    assert allowed[-1]["context"] == {"channel": "#deploy", "task": "REL-7"}
