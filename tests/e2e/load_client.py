"""One load process: N token requests on one persistent channel; prints jtis."""

from __future__ import annotations

import json
import sys

from badgeclient import BadgeError, WorkloadClient

sock, count = sys.argv[1], int(sys.argv[2])
jtis: list[str] = []
errors: list[str] = []
with WorkloadClient(sock) as client:
    for _ in range(count):
        try:
            jtis.append(client.fetch_token(audience="demo", scopes=["read"]).jti)
            if len(jtis) == 1:
                print("first", file=sys.stderr, flush=True)  # lets a test sync on progress
        except BadgeError as exc:
            errors.append(f"{exc.status}: {exc.message}")
print(json.dumps({"jtis": jtis, "errors": errors}))
