"""Real daemons in real processes: ``badged dev`` on a throwaway SoftHSM token."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_or_skip, short_tmpdir


@dataclass
class RunningDaemon:
    state: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def workload(self) -> Path:
        return self.state / "run" / "agent.sock"

    @property
    def admin(self) -> Path:
        return self.state / "run" / "admin.sock"

    def env(self) -> dict[str, str]:
        return dict(os.environ, BADGED_SOCKET=str(self.workload),
                    BADGED_ADMIN_SOCKET=str(self.admin), PYTHONPATH=_pythonpath())

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT / "daemon"), str(ROOT / "clients")])


def badged_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "badged", *args]


def badgectl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "badgeclient._cli.main", *args]


def start_daemon(state: Path, *args: str, timeout: float = 30) -> RunningDaemon:
    log = state.parent / f"{state.name}.log"
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    with open(log, "ab") as log_fh:
        proc = subprocess.Popen(
            badged_cmd("dev", "--state-dir", str(state), *args),
            stdout=subprocess.PIPE, stderr=log_fh, env=env,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            buf += chunk
            if b"badged ready" in buf:
                return RunningDaemon(state, proc, log)
            if not chunk:
                break
        if proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise AssertionError(f"daemon did not start: {buf!r}\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def softhsm_available(request: pytest.FixtureRequest) -> None:
    if shutil.which("softhsm2-util") is None:
        require_or_skip(request.config, "softhsm2-util not installed")


@pytest.fixture(scope="module")
def daemon(softhsm_available: None) -> Iterator[RunningDaemon]:
    base = short_tmpdir("bde")
    os.chmod(base, 0o755)  # like /run: other users must reach the workload socket
    d = start_daemon(base / "s")
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_state(softhsm_available: None) -> Iterator[Path]:
    base = short_tmpdir("bdf")
    yield base / "s"
    shutil.rmtree(base, ignore_errors=True)
