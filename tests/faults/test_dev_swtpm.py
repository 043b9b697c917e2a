"""``badged dev --backend tpm`` owns its swtpm: restarts it, never shares it (issue 15, item 7)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from badgeclient import UnavailableError, WorkloadClient
from tests.conftest import require_or_skip, short_tmpdir
from tests.e2e.conftest import RunningDaemon, badged_cmd, start_daemon
from tests.faults.probes import SERVING, Health

pytestmark = pytest.mark.tpm


def _swtpm_children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if cmd.endswith(b"swtpm"):
                out.append(int(child))
    return out


@pytest.fixture
def dev_tpm(request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    from badged.swtpm import missing_tooling

    missing = missing_tooling()
    if missing:
        require_or_skip(request.config, missing)
    base = short_tmpdir("bdt")
    os.chmod(base, 0o755)
    d = start_daemon(base / "s", "--backend", "tpm", "--signing-mode", "direct", timeout=60)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_dead_dev_swtpm_is_restarted(dev_tpm: RunningDaemon) -> None:
    health = Health(dev_tpm.workload)
    try:
        with WorkloadClient(dev_tpm.workload, timeout=10) as wl:
            wl.sign(b"before")
            [first] = _swtpm_children(dev_tpm.proc.pid)
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 15
            while True:  # a new swtpm, and the same daemon signing with it
                children = _swtpm_children(dev_tpm.proc.pid)
                if children and children != [first]:
                    try:
                        wl.sign(b"after")
                        break
                    except UnavailableError:  # reconnecting; bounded by the deadline
                        pass
                assert time.monotonic() < deadline, "swtpm was not restarted"
                time.sleep(0.1)
            health.wait_for(SERVING, within=5)
        assert dev_tpm.proc.poll() is None
        assert "dev swtpm restarted" in dev_tpm.log_text()
    finally:
        health.close()


def test_second_dev_daemon_leaves_the_running_swtpm_alone(dev_tpm: RunningDaemon) -> None:
    [swtpm] = _swtpm_children(dev_tpm.proc.pid)
    sock = dev_tpm.state / "private" / "swtpm" / "sock"
    ctrl = Path(f"{sock}.ctrl")
    before = (sock.stat().st_ino, ctrl.stat().st_ino)
    second = subprocess.run(badged_cmd("dev", "--state-dir", str(dev_tpm.state),
                                       "--backend", "tpm"),
                            env=dev_tpm.env(), capture_output=True, text=True, timeout=60,
                            check=False)
    assert second.returncode != 0
    assert "another badged is running" in second.stderr, second.stderr
    assert (sock.stat().st_ino, ctrl.stat().st_ino) == before  # sockets untouched
    assert _swtpm_children(dev_tpm.proc.pid) == [swtpm]
    with WorkloadClient(dev_tpm.workload, timeout=10) as wl:
        wl.sign(b"still served")
