"""Refused requests as fast as one client can send them, as another uid (root only).

    flood_denials.py UID SOCKET COUNT

Drops to UID before connecting, then asks COUNT tokens it is not allowed to
get, each with a large caller-chosen audience and scopes (what a denial used
to echo into the audit log). Prints how many were refused, as JSON.
"""

from __future__ import annotations

import json
import os
import sys

import grpc  # noqa: F401 -- preload before dropping privileges

from badgeclient import BadgeError, WorkloadClient

uid, sock, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
client = WorkloadClient(sock)
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
refused = 0
for i in range(count):
    try:
        client.fetch_token(audience=f"https://flood.example/{i:06d}/" + "a" * 200,
                           scopes=[f"s{j}" for j in range(20)])
    except BadgeError:
        refused += 1
print(json.dumps({"refused": refused}), flush=True)
