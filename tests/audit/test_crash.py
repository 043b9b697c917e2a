"""kill -9 at random moments: every acknowledged record survives, the log verifies."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from badged.audit import verify
from tests.audit.helpers import all_records, open_log

CHILD = Path(__file__).with_name("crash_child.py")


def _run_and_kill(directory: Path, key_pem: Path, run: int, rng: random.Random,
                  acked: dict[int, str]) -> None:
    """Start the child, SIGKILL it at a random point, collect what it acknowledged."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(directory), str(key_pem), str(run), "8"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    mode = rng.choice(["acks", "acks", "acks", "startup"])
    target = rng.randint(0, 400)
    lines: list[bytes] = []
    try:
        if mode == "startup":
            # Anywhere in interpreter start, open, crash recovery, first appends.
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            while len(lines) <= target:
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    for line in [*lines, *rest.splitlines(keepends=True)]:
        if not line.endswith(b"\n") or line == b"ready\n":
            continue  # the kill can cut the child's own output mid-line
        seq, jti = line.decode().split()
        acked[int(seq)] = jti


@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_record(audit_dir: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = audit_dir.parent / "key.pem"
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    audit_dir.mkdir(mode=0o700)  # a run killed during start-up may not get that far
    acked: dict[int, str] = {}
    runs = 8
    for run in range(runs):
        _run_and_kill(audit_dir, key_pem, run, rng, acked)
        # After every crash the log, as left on disk, must still verify up to
        # a possibly torn tail (which the next open seals).
        report = verify(audit_dir, key.public_key())
        assert report.ok, f"seed={seed} run={run}: {report.first_bad}"

    open_log(audit_dir).close()  # the daemon's next start: recovery, if needed
    report = verify(audit_dir, key.public_key())
    assert report.ok, f"seed={seed}: {report.first_bad}"
    by_seq = {r["seq"]: r for r in all_records(audit_dir)}
    missing = {s: j for s, j in acked.items() if by_seq.get(s, {}).get("jti") != j}
    assert not missing, f"seed={seed}: acknowledged but not in the log: {missing}"
    assert len(acked) > 0, f"seed={seed}: the child never acknowledged anything"
    assert report.checkpoints > 0
