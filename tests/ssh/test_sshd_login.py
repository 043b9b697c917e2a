"""A real sshd on loopback accepts a login with the agent's key from the bound
process, refuses another uid's process, and a destination-constrained bundle
allows one host key and refuses another (issue 19)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from badgeclient import AdminClient
from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon
from tests.ssh.conftest import NOBODY, agent_sock, audit_records, run

SSHD = "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(not os.path.exists(SSHD) or os.geteuid() != 0,
                                reason="needs openssh-server and root (sshd, nobody)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sshd:
    def __init__(self, base: Path, name: str, authorized: str, extra: str = "") -> None:
        self.dir = base / name
        self.dir.mkdir(mode=0o755)
        self.hostkey = self.dir / "host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.hostkey)],
                       check=True)
        (self.dir / "authorized_keys").write_text(authorized + "\n")
        self.port = _free_port()
        (self.dir / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {self.hostkey}\n"
            f"AuthorizedKeysFile {self.dir}/authorized_keys\nPidFile {self.dir}/pid\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nAllowUsers root\n" + extra)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.05)
        pub = (self.dir / "host_ed25519.pub").read_text().split()
        self.known = self.dir / "known_hosts"
        self.known.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        os.chmod(self.known, 0o644)
        fp = subprocess.run(["ssh-keygen", "-lf", str(self.hostkey) + ".pub"], check=True,
                            capture_output=True, text=True).stdout.split()[1]
        self.fingerprint = fp

    def login(self, d: RunningDaemon, uid: int | None = None,
              *options: str) -> subprocess.CompletedProcess[bytes]:
        return run(d, "ssh", "-F", "/dev/null", *options, "-o", f"IdentityAgent={agent_sock(d)}",
                   "-o", "IdentityFile=none", "-o", "BatchMode=yes",
                   "-o", f"UserKnownHostsFile={self.known}", "-o", "StrictHostKeyChecking=yes",
                   "-o", "ConnectTimeout=10", "-p", str(self.port), "root@127.0.0.1",
                   "echo", "logged-in", uid=uid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def servers(sshd_daemon: RunningDaemon) -> Iterator[tuple[Sshd, Sshd]]:
    pub = run(sshd_daemon, "ssh-add", "-L").stdout.decode().strip()
    base = short_tmpdir("bsh")
    os.chmod(base, 0o755)
    one, two = Sshd(base, "one", pub), Sshd(base, "two", pub)
    yield one, two
    one.stop()
    two.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_sshd_accepts_the_bound_process_and_audits_user_and_host(
        sshd_daemon: RunningDaemon, servers: tuple[Sshd, Sshd]) -> None:
    one, _ = servers
    out = one.login(sshd_daemon)
    assert out.returncode == 0 and out.stdout.strip() == b"logged-in", out.stderr
    rec = [r for r in audit_records(sshd_daemon) if r.get("event") == "ssh.signed"][-1]
    ssh = rec["ssh"]
    assert isinstance(ssh, dict)
    # session-bind@openssh.com told the agent which host: its verified fingerprint.
    assert (ssh["purpose"], ssh["user"], ssh["host_fp"]) == ("auth", "root", one.fingerprint)


def test_sshd_refuses_another_uid_using_the_agent_socket(
        sshd_daemon: RunningDaemon, servers: tuple[Sshd, Sshd]) -> None:
    one, _ = servers
    out = one.login(sshd_daemon, uid=NOBODY)
    assert out.returncode != 0 and b"logged-in" not in out.stdout
    assert b"Permission denied" in out.stderr, out.stderr


def test_destination_constrained_bundle(sshd_daemon: RunningDaemon,
                                        servers: tuple[Sshd, Sshd]) -> None:
    one, two = servers
    path = sshd_daemon.state / "policy.toml"
    original = path.read_text()
    assert 'ssh_namespaces = ["git", "file"]' in original
    path.write_text(original.replace(
        'ssh_namespaces = ["git", "file"]',
        f'ssh_namespaces = ["git", "file"]\nssh_hosts = ["{one.fingerprint}"]'))
    try:
        with AdminClient(sshd_daemon.admin) as a:
            assert a.reload_policy() == (True, "")
        assert one.login(sshd_daemon).returncode == 0
        refused = two.login(sshd_daemon)
        assert refused.returncode != 0 and b"logged-in" not in refused.stdout
        denied = [r for r in audit_records(sshd_daemon) if r.get("event") == "ssh.denied"
                  and isinstance(r.get("request"), dict)]
        assert any(r["request"]["ssh"]["host_fp"] == two.fingerprint  # type: ignore[index]
                   for r in denied)
    finally:
        path.write_text(original)
        with AdminClient(sshd_daemon.admin) as a:
            assert a.reload_policy() == (True, "")
