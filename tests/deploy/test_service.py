"""The production guide, performed: the shipped unit files verify, and a
non-root daemon in the documented layout serves an agent of another user.

The daemon runs as a dedicated system user exactly as ``badged.service``
starts it: ``--config /etc/badged/badged.toml`` (under a temporary root), with
``$NOTIFY_SOCKET`` (Type=notify) and, like the unit's AmbientCapabilities=,
CAP_SYS_PTRACE as its only capability.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, short_tmpdir
from tests.deploy.layout import Layout, user_env, user_python

pytestmark = pytest.mark.slow
PACKAGING = ROOT / "packaging"
NOBODY = 65534


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` with no complaint (unknown keys are only warnings: fail on any)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    unit = (PACKAGING / "systemd" / "badged.service").read_text()
    assert "ExecStart=/opt/badged/bin/badged --config /etc/badged/badged.toml" in unit
    # verify checks that ExecStart exists: point it at this checkout's badged.
    badged = Path(sys.executable).with_name("badged")
    (tmp_path / "badged.service").write_text(unit.replace("/opt/badged/bin/badged", str(badged)))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "badged.service")],
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0 and "Failed to" in proc.stderr and "bus" in proc.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stderr
    for key in ("Type=notify", "RestartPreventExitStatus=2", "NoNewPrivileges=yes",
                "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                "CapabilityBoundingSet=CAP_SYS_PTRACE", "RuntimeDirectory=badged",
                "StateDirectory=badged", "LimitNOFILE="):
        assert re.search(rf"^{re.escape(key)}", unit, re.M), key


def test_sysusers_and_tmpfiles_apply_in_a_scratch_root(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None:
        pytest.skip("systemd-sysusers/systemd-tmpfiles not installed")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --root needs root to chown")
    (tmp_path / "etc").mkdir()
    proc = subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                           str(PACKAGING / "sysusers.d" / "badged.conf")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in
              (tmp_path / "etc" / "group").read_text().splitlines()}
    assert users["badged"][6] == "/usr/sbin/nologin"
    assert "badged" in groups["badged-operators"][3].split(",")
    uid, gid = int(users["badged"][2]), int(users["badged"][3])
    proc = subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                           str(PACKAGING / "tmpfiles.d" / "badged.conf")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    expect = {"etc/badged": (0, gid, 0o750), "run/badged": (uid, gid, 0o755),
              "var/lib/badged": (uid, gid, 0o750),
              "var/lib/badged/softhsm/tokens": (uid, gid, 0o700)}
    for rel, (owner, group, mode) in expect.items():
        st = os.stat(tmp_path / rel)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (owner, group, mode), rel


class Notifications:
    """The systemd side of sd_notify: a datagram socket we read READY=1 from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)  # the daemon runs as another user

    def wait_for(self, field: str, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                seen += self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                break
            if field in seen:
                return seen
        raise AssertionError(f"no {field} from the daemon (got {seen})")


@pytest.fixture
def served(layout: Layout) -> Iterator[tuple[Layout, subprocess.Popen[bytes], Notifications]]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    layout.write_config(operator_group=f'"{layout.user.name}"')
    note_dir = short_tmpdir("bdn")
    os.chmod(note_dir, 0o755)
    notes = Notifications(note_dir / "notify")
    log = open(layout.root / "daemon.log", "wb")  # noqa: SIM115 -- closed below
    # As badged.service starts it: User=, Group=, AmbientCapabilities=CAP_SYS_PTRACE.
    cmd = ["setpriv", f"--reuid={layout.user.uid}", f"--regid={layout.user.gid}", "--init-groups",
           "--inh-caps=+sys_ptrace", "--ambient-caps=+sys_ptrace", "--bounding-set=-all,+sys_ptrace",
           *layout.badged("--config", str(layout.config))]
    proc = subprocess.Popen(cmd, env=user_env(NOTIFY_SOCKET=str(notes.path)),
                            stdout=subprocess.DEVNULL, stderr=log, cwd="/")
    try:
        yield layout, proc, notes
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
        notes.sock.close()
        shutil.rmtree(note_dir, ignore_errors=True)


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([user_python(), "-m", "badgeclient._cli.main", *args], user=NOBODY,
                          group=NOBODY, extra_groups=[], capture_output=True, text=True,
                          timeout=60, env=user_env(), check=False, cwd="/")


def test_non_root_daemon_serves_an_agent_of_another_user(
        served: tuple[Layout, subprocess.Popen[bytes], Notifications]) -> None:
    layout, proc, notes = served
    fields = notes.wait_for("READY=1")
    assert f"MAINPID={proc.pid}" in fields or any(f.startswith("MAINPID=") for f in fields)
    # Runs as the dedicated user, with CAP_SYS_PTRACE only, and is named badged.
    status = Path(f"/proc/{proc.pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{layout.user.uid}\s", status, re.M)
    assert re.search(r"^CapEff:\s+0000000000080000$", status, re.M), status  # bit 19 = SYS_PTRACE
    assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "badged"
    if shutil.which("pgrep"):  # what `pkill -HUP -x badged` (README) signals
        pids = subprocess.run(["pgrep", "-x", "badged"], capture_output=True, text=True).stdout.split()
        assert str(proc.pid) in pids
    # Sockets as documented: agent.sock 0666, admin.sock 0660 group operator_group.
    agent_sock, admin_sock = layout.run_dir / "agent.sock", layout.run_dir / "admin.sock"
    assert os.stat(agent_sock).st_mode & 0o777 == 0o666
    st = os.stat(admin_sock)
    assert (st.st_mode & 0o777, st.st_gid) == (0o660, layout.user.gid)
    # The operator creates the agent (root may use the admin socket) ...
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    create = subprocess.run([sys.executable, "-m", "badgeclient._cli.main", "agent", "create",
                             "web-agent", "--admin-socket", str(admin_sock)],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert create.returncode == 0, create.stderr
    # ... and a process of another user (nobody) gets a token over the workload socket,
    who = _as_nobody("whoami", "--json", "--socket", str(agent_sock))
    assert who.returncode == 0, who.stderr
    me = json.loads(who.stdout)
    assert me["uid"] == NOBODY and me["exe"]  # CAP_SYS_PTRACE: the caller's exe is readable
    tok = _as_nobody("token", "--audience", "https://api.example.com", "--scope", "read", "--json",
                     "--socket", str(agent_sock))
    assert tok.returncode == 0, tok.stderr
    assert json.loads(tok.stdout)["agent"] == "web-agent"
    # Reload as `systemctl reload badged` does (ExecReload=kill -HUP $MAINPID).
    os.kill(proc.pid, signal.SIGHUP)
    time.sleep(0.3)
    assert proc.poll() is None
    # Stop as systemd does: SIGTERM, STOPPING=1, exit 0, sockets gone.
    proc.send_signal(signal.SIGTERM)
    notes.wait_for("STOPPING=1")
    assert proc.wait(timeout=30) == 0
    assert not agent_sock.exists() and not admin_sock.exists()
    assert pwd.getpwuid(os.stat(layout.state / "device-key.pem").st_uid).pw_name == layout.user.name
