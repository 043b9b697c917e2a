"""kill -9 at random points of create/rotate/revoke, in a loop, on a real SoftHSM token.

Each iteration starts a real process (tests/e2e/state_kill_child.py) that
runs the daemon's start-up path -- audit crash recovery, registry load,
start-up reconcile, wired as ``badged.app`` wires them -- reports what the
token holds, then changes identities and issues tokens until it is SIGKILLed:
either by itself at a numbered step of the change protocol (every pending
write, registry save, audit append and key-store call; before or after it)
or by this test at a random moment. After every restart these must hold:

* every agent key in the token is the current key of an active agent in the
  registry (nothing else in ``badged/agent/``); every other key is quarantined;
* the token's keys are the ones the registry names (same kid);
* every registry entry has its audit records: each key version a commit
  record with its kid, each revocation its record, every intent a terminal
  record (completed, aborted or recovered), every key in the token a
  ``key.created``/``key.quarantined`` record with its kid;
* every token a child handed out verifies with a key the registry holds and
  was audited *after* that key's commit record;
* the audit log verifies against the device key.

CI runs 50 iterations (BADGED_KILL_ITERATIONS). Soak::

    BADGED_KILL_ITERATIONS=1000 BADGED_KILL_SEED=$RANDOM \\
        .venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e/test_kill_loop.py -s
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from badged.audit import verify
from badged.audit.reader import iter_records
from tests.conftest import require_or_skip, short_tmpdir
from tests.e2e.state_checks import check_restart_invariants, check_tokens

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

CHILD = Path(__file__).with_name("state_kill_child.py")
ITERATIONS = int(os.environ.get("BADGED_KILL_ITERATIONS", "50"))
SEED = int(os.environ.get("BADGED_KILL_SEED", "1515"))
STEPS = 36  # numbered protocol steps a child may die at (a few ops' worth)


def _read_until_ready(proc: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if b"\nready\n" in buf:
                for line in buf.decode().splitlines():
                    if line.startswith("state "):
                        state: dict[str, Any] = json.loads(line[6:])
                        return state
    proc.kill()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    raise AssertionError(f"child did not get ready (start-up refused?): {buf[-500:]!r}\n{err}")


def test_kill_9_during_create_rotate_revoke_keeps_state_and_audit_consistent(
        request: pytest.FixtureRequest) -> None:
    if shutil.which("softhsm2-util") is None:
        require_or_skip(request.config, "softhsm2-util not installed")
    from badged.softhsm import provision

    base = short_tmpdir("bkl")
    try:
        token = provision(base / "hsm", label="kill-loop")
        (base / "private").mkdir(mode=0o700)
        (base / "token").write_text(f"{token.uri()} {token.module_path}\n")
        env = dict(os.environ, SOFTHSM2_CONF=str(token.conf_path))
        rng = random.Random(SEED)
        tokens: list[str] = []
        acks: Counter[str] = Counter()
        deaths: Counter[str] = Counter()
        t0 = time.monotonic()
        for it in range(ITERATIONS + 1):
            last = it == ITERATIONS
            kill_at = -1 if (last or it % 3 == 0) else rng.randrange(STEPS)
            proc = subprocess.Popen([sys.executable, str(CHILD), str(base), str(it), str(kill_at)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env)
            assert proc.stdin is not None
            try:
                snap = _read_until_ready(proc)
                check_restart_invariants(base, snap)
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
                if kill_at < 0:
                    time.sleep(0 if last else rng.uniform(0.0, 0.6))
                    proc.kill()
                out, err = proc.communicate(timeout=60)  # also closes stdin
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == -9, f"child {it} died by itself: {err.decode()[-2000:]}"
            deaths["final" if last else "step" if kill_at >= 0 else "random"] += 1
            for line in out.decode().splitlines():
                if line.startswith("token "):
                    tokens.append(line[6:])
                elif line.startswith("ack "):
                    acks[line.split()[1]] += 1
        checked = check_tokens(base, tokens)
        device = serialization.load_pem_public_key(snap["device"].encode())
        assert isinstance(device, ec.EllipticCurvePublicKey)
        report = verify(base / "audit", device)
        assert report.ok, report.first_bad
        elapsed = time.monotonic() - t0
        recs = list(iter_records(base / "audit"))
        outcomes = Counter(str(r["outcome"]) for r in recs if r["event"] == "registry.recovered")
        quarantined = sum(r["event"] == "key.quarantined" for r in recs)
        print(f"\nkill loop: {ITERATIONS} kills ({dict(deaths)}), acknowledged {dict(acks)}, "
              f"{checked} tokens checked, changes recovered at start {dict(outcomes)}, "
              f"{quarantined} keys quarantined, {len(report.recoveries)} audit tail "
              f"recoveries, {elapsed:.1f}s")
        assert acks["create"] and acks["rotate"] and acks["revoke"]
        # The kills did land inside changes, on both sides of the commit point.
        assert outcomes["applied"] and outcomes["not-applied"]
    finally:
        if os.environ.get("BADGED_KILL_KEEP"):
            print(f"state kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
