"""Delegation calls as another uid (root only), for tests/e2e/test_context_status.py.

Imports everything while still root, then drops to the target uid *before*
the first connect(), so the daemon's SO_PEERCRED sees that user.
Usage: as_user_delegations.py UID SOCKET (delegate AGENT | list | revoke ID | token AUD)
"""

from __future__ import annotations

import json
import os
import sys

import grpc  # noqa: F401 -- preload before dropping privileges

from badgeclient import BadgeError, WorkloadClient

uid, sock, what = int(sys.argv[1]), sys.argv[2], sys.argv[3]
client = WorkloadClient(sock)
if uid != os.getuid():
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
out: dict[str, object]
try:
    if what == "delegate":
        d = client.delegate(agent=sys.argv[4], scopes=["read"], audiences=["demo"],
                            ttl_seconds=600, reason="test")
        out = {"ok": True, "id": d.id}
    elif what == "token":
        tok = client.fetch_token(audience=sys.argv[4])
        out = {"ok": True, "token": tok.token}
    elif what == "list":
        out = {"ok": True, "ids": [d.id for d in client.my_delegations()]}
    else:
        d = client.revoke_my_delegation(sys.argv[4])
        out = {"ok": True, "revoked": d.revoked}
except BadgeError as exc:
    out = {"ok": False, "status": exc.status, "message": exc.message}
print(json.dumps(out), flush=True)
