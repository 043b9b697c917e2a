"""One load process for the swtpm kill test: fetch tokens until STOP_FILE exists.

Prints ``first`` on stderr after its first token (the test syncs on it), and
at the end one JSON line on stdout: every jti it *received* and every error.
"""

from __future__ import annotations

import json
import os
import sys

from badgeclient import BadgeError, WorkloadClient

sock, stop_file = sys.argv[1], sys.argv[2]
jtis: list[str] = []
errors: list[str] = []
with WorkloadClient(sock, timeout=20) as client:
    while not os.path.exists(stop_file):
        try:
            jtis.append(client.fetch_token(audience="demo", scopes=["read"]).jti)
            if len(jtis) == 1:
                print("first", file=sys.stderr, flush=True)
        except BadgeError as exc:
            errors.append(f"{exc.status}: {exc.message}")
print(json.dumps({"jtis": jtis, "errors": errors}))
