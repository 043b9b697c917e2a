"""Issue 21 through the credential proxy: each downstream call joins the
caller's trace and its issuance's transaction id, so `badgectl audit trace`
shows the call made with the credential."""

from __future__ import annotations

import json
import subprocess

from tests.e2e.conftest import badgectl_cmd
from tests.proxy.conftest import ProxyEnv
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
