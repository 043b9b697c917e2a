"""Child process of the kill -9 loop (tests/e2e/test_kill_loop.py).

Run as ``python state_kill_child.py STATE SEED KILL_AT``. Does what the daemon
does at start-up -- opens the real SoftHSM token, the audit log (crash
recovery), the agent registry, and runs the start-up reconcile, wired exactly
as ``badged.app`` wires them -- then prints one ``state {json}`` line (what the
token holds now) and ``ready``, and then changes identities forever:
create, rotate, revoke, and issue tokens (audited before they are printed,
as the daemon answers only after the audit record is durable).

``KILL_AT >= 0``: the process SIGKILLs itself at that numbered step (every
pending-file write, registry save, audit append and key-store call is a
step; even numbers die just before the step, odd ones just after), so every
point of the protocol gets hit. ``KILL_AT < 0``: the parent kills it at a
random moment. After ``ready`` it waits for a line on stdin (the parent
checks the restart invariants on a state at rest).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "clients")]

from cryptography.hazmat.primitives import serialization  # noqa: E402

from badged.audit import AuditConfig, AuditLog  # noqa: E402
from badged.audit.reader import find_marked  # noqa: E402
from badged.core.jose import ec_public_jwk, jwk_thumbprint  # noqa: E402
from badged.core.tokens import build_claims, mint_token  # noqa: E402
from badged.errors import KeyNotFoundError  # noqa: E402
from badged.identity.registry import AgentRegistry  # noqa: E402
from badged.identity.store import AgentStore  # noqa: E402
from badged.keystore.pkcs11.store import Pkcs11Config, Pkcs11KeyStore  # noqa: E402

DEVICE_KEY = "badged/device/v1"
T = TypeVar("T")


class Killer:
    """Counts protocol steps; dies by SIGKILL at the chosen one."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.n = 0

    def wrap(self, fn: Callable[..., T]) -> Callable[..., T]:
        def step(*args: Any, **kwargs: Any) -> T:
            here = self.n
            self.n += 1
            if here == self.at and here % 2 == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                return fn(*args, **kwargs)
            finally:  # also when the step raised (and the caller would handle it)
                if here == self.at:
                    os.kill(os.getpid(), signal.SIGKILL)
        return step


def main(state: Path, seed: int, kill_at: int) -> None:
    rng = random.Random(seed)
    out = sys.stdout
    uri, module = (state / "token").read_text().split()
    ks = Pkcs11KeyStore.from_config(Pkcs11Config(uri=uri, module_path=module))
    try:
        device = ks.get(DEVICE_KEY)
    except KeyNotFoundError:
        device = ks.generate(DEVICE_KEY)
    audit_dir = state / "audit"
    log = AuditLog.open(AuditConfig(directory=audit_dir, checkpoint_records=25,
                                    checkpoint_seconds=None), signer=device)
    store = AgentStore(state / "private" / "agents.json")
    registry = AgentRegistry(store=store, keystore=ks, clock=time.time,
                             trust_domain="example.org", max_token_ttl=600)
    registry.ssh_keys = True  # three keys per version, as with the SSH agent socket on
    registry.set_audit(log.append_sync)
    registry.reconcile(lambda op: {str(r.get("event")) for r in find_marked(audit_dir, op)
                                   if r.get("op") == op})
    kids = {name: jwk_thumbprint(ec_public_jwk(ks.get(name).public_key()))
            for name in ks.list() if name.startswith("badged/agent/")}
    kids.update({name: jwk_thumbprint(ec_public_jwk(ks.get(name).public_key()))
                 for name in ks.list() if name.startswith("badged/quarantine/")})
    device_pem = device.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    out.write("state " + json.dumps({"labels": list(ks.list()), "kids": kids,
                                     "device": device_pem}) + "\n")
    out.write("ready\n")
    out.flush()
    sys.stdin.readline()  # the parent checks the state at rest, then says go

    killer = Killer(kill_at)
    for name in ("save", "write_pending", "clear_pending"):
        setattr(store, name, killer.wrap(getattr(store, name)))
    for name in ("generate", "destroy", "relabel"):
        setattr(ks, name, killer.wrap(getattr(ks, name)))
    audited: Callable[[Mapping[str, Any]], object] = killer.wrap(log.append_sync)
    registry.set_audit(audited)

    i = 0
    while True:
        i += 1
        active = [a.name for a in registry.list()]
        roll = rng.random()
        if not active or (roll < 0.3 and len(active) < 6):
            name = f"a{seed}-{i}"
            registry.create(name)
            out.write(f"ack create {name}\n")
        elif roll < 0.6:
            name = rng.choice(active)
            registry.rotate(name)
            out.write(f"ack rotate {name}\n")
        elif roll < 0.75 and len(active) > 2:
            name = rng.choice(active)
            registry.revoke(name, "kill loop")
            out.write(f"ack revoke {name}\n")
        else:
            name = rng.choice(active)
            key = registry.token_key(name)
            jti = f"{seed}-{i}"
            claims = build_claims(issuer="https://kill.test", subject=key.spiffe_id,
                                  audience="demo", scopes=(), ttl_seconds=300, now=time.time(),
                                  jti=jti)
            token = mint_token(claims=claims, key=key.handle, key_id=key.kid)
            audited({"event": "token.issued", "agent": name, "jti": jti, "kid": key.kid})
            out.write(f"token {token.token}\n")
        out.flush()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
