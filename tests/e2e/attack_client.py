"""One workload call for the attack tests (tests/e2e/test_attack_attest.py).

Run by whatever interpreter the attack needs (a pinned copy, an impostor
copy, inside ``unshare -Urm``), so it imports only badgeclient and grpc.
Started as root with ``--uid``, it imports first, optionally moves itself
into a cgroup (``--cgroup-before``, as root), drops to the uid before the
first ``connect()``, and optionally moves itself on as that user
(``--cgroup-after``: a delegated subtree the user owns). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc  # noqa: F401 -- preload before dropping privileges

from badgeclient import BadgeError, WorkloadClient


def _move(cgroup_dir: str) -> None:
    os.makedirs(cgroup_dir, exist_ok=True)
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as fh:
        fh.write(str(os.getpid()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("action", choices=["token", "sign", "delegate", "whoami"])
    ap.add_argument("--agent", default="")
    ap.add_argument("--audience", default="demo")
    ap.add_argument("--uid", type=int)
    ap.add_argument("--cgroup-before")
    ap.add_argument("--cgroup-after")
    args = ap.parse_args()
    if args.cgroup_before:
        _move(args.cgroup_before)
    if args.uid is not None:
        os.setgroups([])
        os.setgid(args.uid)
        os.setuid(args.uid)
    if args.cgroup_after:
        _move(args.cgroup_after)
    client = WorkloadClient(args.socket)
    out: dict[str, object]
    try:
        if args.action == "token":
            tok = client.fetch_token(audience=args.audience, agent=args.agent or None)
            out = {"ok": True, "agent": tok.agent}
        elif args.action == "sign":
            sig = client.sign(b"attack", agent=args.agent or None)
            out = {"ok": True, "agent": sig.agent}
        elif args.action == "delegate":
            d = client.delegate(agent=args.agent, scopes=["read"])
            out = {"ok": True, "delegation": d.id}
        else:
            me = client.whoami()
            out = {"ok": True, "uid": me.uid, "selectors": me.selectors,
                   "agents": [a.agent for a in me.agents]}
    except BadgeError as exc:
        out = {"ok": False, "status": exc.status, "code": exc.code, "message": exc.message}
    print(json.dumps(out), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
