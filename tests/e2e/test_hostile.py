"""Issue 16 against a real daemon: a uid that matches no rule tries to make it hold memory.

The attacker is a real process running as ``nobody`` (the threat is another
local user), speaking HTTP/2 by hand and respecting flow control the way a
careful attacker would (so it is not simply cut off with FLOW_CONTROL_ERROR).
The daemon's RSS must stay bounded while it attacks, a legitimate caller
must still get tokens, and every attacking connection must be closed with a
reason once the request-body timeout has passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from badgeclient import WorkloadClient
from tests.e2e.conftest import RunningDaemon

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]
HERE = Path(__file__).parent
NOBODY = 65534


def _attack(daemon: RunningDaemon, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HERE / "hostile_client.py"), str(NOBODY),
                             "bodies", str(daemon.workload), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=daemon.env())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_unfinished_bodies_from_an_unbound_uid_stay_bounded_and_time_out(
        daemon: RunningDaemon) -> None:
    # 16 connections x 20 streams x ~100 KB bodies that never end: ~32 MB if
    # the daemon took everything offered (it did: 1 MiB stream windows and a
    # 16 MiB connection window, never enforced, no timeout).
    with WorkloadClient(daemon.workload) as c:
        c.fetch_token(audience="demo")  # warm: the daemon's steady state
    time.sleep(0.5)
    base = daemon.rss_kb()
    peak = [base]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], daemon.rss_kb())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    attacker = _attack(daemon, "16", "20", "100000", "25")
    try:
        time.sleep(3)  # the attack is in full swing
        t0 = time.monotonic()
        with WorkloadClient(daemon.workload) as c:
            for _ in range(5):
                assert c.fetch_token(audience="demo").token
        legit = time.monotonic() - t0
        out, err = attacker.communicate(timeout=60)
    finally:
        stop.set()
        watcher.join()
        if attacker.poll() is None:
            attacker.kill()
    assert attacker.returncode == 0, err
    report = json.loads(out)
    growth_mb = (peak[0] - base) / 1024
    assert growth_mb < 12, f"daemon grew {growth_mb:.1f} MB under the attack ({report['sent']} B sent)"
    # Without budgets the attacker could send ~32 MB; it got its unbound budget's worth.
    assert report["sent"] <= 2 << 20, report["sent"]  # the unbound budget
    assert legit < 5, f"legitimate calls took {legit:.1f}s during the attack"
    ended = report["ended"]
    reasons = {(e["goaway"] or [None, "closed" if e["closed"] else "open"])[1] for e in ended}
    assert all(e["goaway"] or e["closed"] for e in ended), f"connections still open: {reasons}"
    assert any("request body not received" in r for r in reasons), reasons
    assert report["elapsed"] < 20, "connections outlived the body timeout"


def _audit_records(state: Path) -> list[dict[str, object]]:
    from badged.audit.reader import iter_records

    return list(iter_records(state / "audit"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_a_flood_of_denials_becomes_counted_records_and_few_log_lines(fresh_state: Path) -> None:
    from tests.e2e.conftest import start_daemon

    os.chmod(fresh_state.parent, 0o755)
    d = start_daemon(fresh_state)
    try:
        before = sum(f.stat().st_size for f in (fresh_state / "audit").iterdir())
        log_before = len(d.log_text())
        n = 600
        out = subprocess.run([sys.executable, str(HERE / "flood_denials.py"), str(NOBODY),
                              str(d.workload), str(n)], capture_output=True, text=True,
                             env=d.env(), timeout=120, check=True)
        assert json.loads(out.stdout) == {"refused": n}
        grown = sum(f.stat().st_size for f in (fresh_state / "audit").iterdir()) - before
        log_grown = len(d.log_text()) - log_before
    finally:
        d.stop()
    records = _audit_records(fresh_state)
    denied = [r for r in records if r.get("decision") == "deny"]
    counted = [r for r in records if r.get("event") == "denial.repeated"]
    # One full record per kind of denial (the first), the rest counted at shutdown.
    assert 1 <= len(denied) <= 3, [r.get("event") for r in denied]
    assert sum(int(str(r["count"])) for r in counted) + len(denied) == n, counted
    first = denied[0]
    assert len(json.dumps(first)) < 4000, "echoed request fields not capped"
    assert grown < 20_000, f"audit grew {grown} bytes for {n} identical denials"
    assert log_grown < 5_000, f"log grew {log_grown} bytes for {n} denials"
