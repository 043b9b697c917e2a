"""An agent process for the proxy tests: a real, separate process using httpx over
the proxy's Unix socket, as docs/proxy.md tells agents to.

argv: SOCKET [UID]. Reads one JSON call per stdin line ({method, host, path,
headers, body}), answers one JSON line ({status, headers, body}); lives until
stdin closes, so the test can read its environment and /proc/PID/mem meanwhile.
With UID, drops to that uid before the first connect (as tests/e2e/as_user.py).
"""

from __future__ import annotations

import json
import os
import sys

import httpx

sock = sys.argv[1]
# Built (every import done) before dropping privileges: the interpreter's own
# files may not be readable by the target uid.
client = httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=60,
                      follow_redirects=False)
if len(sys.argv) > 2:
    uid = int(sys.argv[2])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    call = json.loads(line)
    try:
        r = client.request(call.get("method", "GET"),
                           f"http://{call['host']}{call.get('path', '/')}",
                           headers=call.get("headers", {}),
                           content=call.get("body", "").encode())
        out = {"status": r.status_code, "headers": dict(r.headers), "body": r.text}
    except httpx.HTTPError as exc:
        out = {"status": 0, "error": type(exc).__name__}
    print(json.dumps(out), flush=True)
