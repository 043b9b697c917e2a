"""Run one workload/admin call as another uid (root only).

Everything is imported while still root (the interpreter and stdlib may live
under /root), then the process drops to the target uid *before* the first
connect(), so the daemon's SO_PEERCRED sees the unprivileged user.
"""

from __future__ import annotations

import json
import os
import sys

import grpc  # noqa: F401 -- preload before dropping privileges

from badgeclient import AdminClient, BadgeError, WorkloadClient

uid, what, sock = int(sys.argv[1]), sys.argv[2], sys.argv[3]
client: WorkloadClient | AdminClient = AdminClient(sock) if what == "admin" else WorkloadClient(sock)
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
try:
    if what == "token":
        tok = client.fetch_token(audience=sys.argv[4])  # type: ignore[union-attr]
        out = {"ok": True, "agent": tok.agent}
    elif what == "whoami":
        me = client.whoami()  # type: ignore[union-attr]
        out = {"ok": True, "uid": me.uid, "agents": [a.agent for a in me.agents]}
    else:
        out = {"ok": True, "agents": [a.name for a in client.list_agents()]}  # type: ignore[union-attr]
except BadgeError as exc:
    out = {"ok": False, "status": exc.status, "code": exc.code, "message": exc.message}
print(json.dumps(out), flush=True)
