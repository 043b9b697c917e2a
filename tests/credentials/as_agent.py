"""Run credential calls as another uid (root only), one process, printing JSON.

    python as_agent.py UID SOCKET OP [ARG ...]

Everything is imported while still root, then the process drops to ``UID``
*before* the first connect(), so the daemon's SO_PEERCRED sees that user:
the caller is a real low-privilege process, not a flag in a request.

OPs: ``assertion AUDIENCE CLIENT_ID``, ``attestation AUDIENCE CLIENT_ID``,
``token AUDIENCE``, ``whoami``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import grpc  # noqa: F401 -- preload before dropping privileges

from badgeclient import BadgeError, WorkloadClient
from badgeclient.credentials import CredentialClient

uid, sock, op, args = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
creds = CredentialClient(sock)
work = WorkloadClient(sock)
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
out: dict[str, Any]
try:
    if op == "assertion":
        a = creds.client_assertion(audience=args[0], client_id=args[1])
        out = {"ok": True, "credential": a.assertion, "agent": a.agent, "client_id": a.client_id}
    elif op == "attestation":
        t = creds.client_attestation(audience=args[0], client_id=args[1])
        out = {"ok": True, "credential": t.attestation, "pop": t.pop, "agent": t.agent,
               "client_id": t.client_id}
    elif op == "token":
        tok = work.fetch_token(audience=args[0])
        out = {"ok": True, "credential": tok.token, "agent": tok.agent}
    elif op == "whoami":
        me = work.whoami()
        out = {"ok": True, "uid": me.uid, "text": repr(me),
               "agents": [a.agent for a in me.agents], "misses": me.misses}
    else:
        raise SystemExit(f"unknown op {op}")
except BadgeError as exc:
    out = {"ok": False, "status": exc.status, "code": exc.code, "message": exc.message}
print(json.dumps(out), flush=True)
