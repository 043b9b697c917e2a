"""The daemon's wall clock stepped by ±1 h (libfaketime on the daemon only).

What must hold (issue 15, item 5): rate buckets and grant countdowns run on
the monotonic clock, so a step changes nothing about them -- with the wall
clock they did: -1 h kept a budget empty, a step back kept a grant alive,
+1 h refilled a budget at once and ended a grant early -- and every step is
audited (``clock.stepped``). A step forward no longer unpublishes a retired
key whose tokens are still live (its window also counts on the monotonic clock).

libfaketime 0.9.10 (Debian 12) with ``FAKETIME_DONT_FAKE_MONOTONIC=1`` breaks
``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)``, which Python 3.11's
``time.sleep`` uses (wolfcw/libfaketime#426: EINVAL), so the daemon gets a
``sitecustomize`` that sleeps with ``select`` instead; nothing else changes.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from badgeclient import AdminClient, PermissionDeniedError, RateLimitedError, WorkloadClient
from badgeclient.verify import Verifier
from tests.conftest import require_or_skip, short_tmpdir
from tests.e2e.conftest import RunningDaemon, _pythonpath

LIBFAKETIME = next((p for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                                "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                                "/usr/lib/faketime/libfaketime.so.1")
                    if os.path.exists(p)), None)

POLICY = """
[bundle.demo]
audiences = ["demo"]
scopes = ["read"]
kinds = ["token"]
max_ttl = "5m"
rate = "2/20s"

[bundle.extra]
audiences = ["extra"]
scopes = ["read"]
kinds = ["token"]
max_ttl = "5m"

[[agent]]
name = "demo-agent"
selectors = ["unix:uid:{uid}"]
bundles = ["demo"]
"""

SLEEP_SHIM = '''"""Test-only: libfaketime#426 breaks time.sleep; sleep with select instead."""
import select
import time


def _sleep(seconds):
    if seconds > 0:
        select.select([], [], [], seconds)


time.sleep = _sleep
'''


def _start_config_daemon(state: Path, cfg: Path, env: dict[str, str]) -> RunningDaemon:
    log = state.parent / f"{state.name}.log"
    with open(log, "ab") as log_fh:
        proc = subprocess.Popen([sys.executable, "-m", "badged", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=log_fh, env={**os.environ, **env})
    assert proc.stdout is not None
    deadline, buf = time.monotonic() + 30, b""
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            buf += os.read(proc.stdout.fileno(), 4096)
            if b"badged ready" in buf:
                return RunningDaemon(state, proc, log)
    proc.kill()
    proc.wait()
    raise AssertionError(f"daemon did not start: {buf!r}\n{log.read_text(errors='replace')}")


class SteppedDaemon:
    def __init__(self, d: RunningDaemon, offset_file: Path, audit_dir: Path) -> None:
        self.d = d
        self._offset = offset_file
        self._audit = audit_dir

    def step(self, spec: str, expect: float) -> None:
        """Set the daemon's clock offset and wait until the daemon audited the step."""
        before = len(self.steps())
        self._offset.write_text(spec + "\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            steps = self.steps()
            if len(steps) > before:
                assert abs(steps[-1] - expect) < 5, steps
                return
            time.sleep(0.1)
        raise AssertionError(f"clock step {spec} not audited")

    def steps(self) -> list[float]:
        out = []
        for path in sorted(self._audit.glob("audit-*.jsonl")):
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("event") == "clock.stepped":
                    out.append(float(rec["delta_seconds"]))
        return out


@pytest.fixture
def stepped(request: pytest.FixtureRequest) -> Iterator[SteppedDaemon]:
    from badged.softhsm import provision

    if LIBFAKETIME is None:
        require_or_skip(request.config, "libfaketime not installed (apt-get install faketime)")
    if shutil.which("softhsm2-util") is None:
        require_or_skip(request.config, "softhsm2-util not installed")
    base = short_tmpdir("bclk")
    try:
        state = base / "s"
        state.mkdir(mode=0o755)
        shim = base / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(SLEEP_SHIM)
        offset = base / "offset"
        offset.write_text("+0\n")
        token = provision(base / "hsm", label="badged-clock")
        (state / "policy.toml").write_text(POLICY.format(uid=os.getuid()))
        cfg = state / "badged.toml"
        cfg.write_text(f"""[daemon]
state_dir = "{state}"
workload_socket = "{state}/run/agent.sock"
admin_socket = "{state}/run/admin.sock"
policy_file = "{state}/policy.toml"
default_ttl = "60s"
max_ttl = "5m"

[keystore]
backend = "pkcs11"
uri = "{token.uri()}"
module_path = "{token.module_path}"

[audit]
dir = "{state}/audit"
""")
        env = {"SOFTHSM2_CONF": str(token.conf_path), "LD_PRELOAD": LIBFAKETIME,
               "FAKETIME_TIMESTAMP_FILE": str(offset), "FAKETIME_DONT_FAKE_MONOTONIC": "1",
               "FAKETIME_CACHE_DURATION": "1",
               "PYTHONPATH": os.pathsep.join([str(shim), _pythonpath()])}
        d = _start_config_daemon(state, cfg, env)
        try:
            with AdminClient(d.admin) as admin:
                admin.create_agent("demo-agent")
            yield SteppedDaemon(d, offset, state / "audit")
        finally:
            d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _token(wl: WorkloadClient, audience: str) -> None:
    wl.fetch_token(audience=audience, scopes=["read"])


def _exhaust(wl: WorkloadClient) -> float:
    """Spend the demo budget (2 per 20 s); monotonic time it ran out."""
    for _ in range(4):
        try:
            _token(wl, "demo")
        except RateLimitedError:
            return time.monotonic()
    raise AssertionError("the budget never ran out")


def test_rate_budget_ignores_wall_clock_steps(stepped: SteppedDaemon) -> None:
    with WorkloadClient(stepped.d.workload, timeout=10) as wl:
        # Back one hour: the wall-clock bucket stayed empty (no refill for
        # "negative" elapsed time); on the monotonic clock it refills in 10 s.
        empty_at = _exhaust(wl)
        stepped.step("-1h", -3600)
        while time.monotonic() - empty_at < 10.3:
            time.sleep(0.1)
        _token(wl, "demo")
        # Forward one hour: the wall-clock bucket refilled at once (a flood);
        # on the monotonic clock it is still empty.
        empty_at = _exhaust(wl)
        stepped.step("+1h", 7200)
        assert time.monotonic() - empty_at < 9
        with pytest.raises(RateLimitedError):
            _token(wl, "demo")


def test_grant_countdown_ignores_wall_clock_steps(stepped: SteppedDaemon) -> None:
    duration = 8
    with WorkloadClient(stepped.d.workload, timeout=10) as wl, \
            AdminClient(stepped.d.admin) as admin:
        with pytest.raises(PermissionDeniedError):
            _token(wl, "extra")
        # Back one hour: a wall-clock grant would stay active for an hour more.
        admin.grant_bundle("demo-agent", "extra", duration_seconds=duration, reason="test back")
        granted = time.monotonic()
        _token(wl, "extra")
        stepped.step("-1h", -3600)
        _token(wl, "extra")
        while time.monotonic() - granted < duration + 0.5:
            time.sleep(0.1)
        with pytest.raises(PermissionDeniedError):
            _token(wl, "extra")
        # Forward one hour: a wall-clock grant would end at once.
        admin.grant_bundle("demo-agent", "extra", duration_seconds=duration, reason="test fwd")
        granted = time.monotonic()
        stepped.step("+1h", 7200)
        assert time.monotonic() - granted < duration - 1
        _token(wl, "extra")
        while time.monotonic() - granted < duration + 0.5:
            time.sleep(0.1)
        with pytest.raises(PermissionDeniedError):
            _token(wl, "extra")
    assert [round(s / 3600) for s in stepped.steps()] == [-1, 2]


def test_forward_step_keeps_a_retired_key_published(stepped: SteppedDaemon) -> None:
    """Rotate, then +1 h: the old key's publish_until (rotate + 5 min + 30 s)
    is an hour in the daemon's past, yet its token lives for minutes in real
    time. The wall-clock JWKS dropped the key, and the relying party (with a
    correct clock: this process is not faked) refused the live token."""
    with WorkloadClient(stepped.d.workload, timeout=10) as wl, \
            AdminClient(stepped.d.admin) as admin:
        old = wl.fetch_token(audience="demo", scopes=["read"])
        admin.rotate_agent("demo-agent")
        stepped.step("+1h", 3600)
        jwks = wl.jwks()
        assert old.key_id in {k["kid"] for k in jwks["keys"]}
        verified = Verifier(jwks=jwks).verify_token(old.token, audience="demo")
        assert verified.agent.endswith("/agent/demo-agent")
