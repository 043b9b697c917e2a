"""A real ``badged dev`` daemon with its SSH agent socket, and helpers to drive it
with the real OpenSSH tools (and a raw client for what they will not send)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon, softhsm_available, start_daemon

__all__ = ["softhsm_available"]

NOBODY = 65534


@pytest.fixture(scope="module")
def sshd_daemon(softhsm_available: None) -> Iterator[RunningDaemon]:
    if shutil.which("ssh-add") is None:
        pytest.skip("openssh-client not installed")
    base = short_tmpdir("bss")
    os.chmod(base, 0o755)  # other users must reach run/ssh-agent.sock
    d = start_daemon(base / "s")
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def agent_sock(d: RunningDaemon) -> Path:
    return d.state / "run" / "ssh-agent.sock"


def ssh_env(d: RunningDaemon) -> dict[str, str]:
    env = dict(os.environ, SSH_AUTH_SOCK=str(agent_sock(d)))
    env.pop("SSH_ASKPASS", None)
    return env


def run(d: RunningDaemon, *cmd: str, uid: int | None = None, cwd: Path | None = None,
        stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run an OpenSSH tool against the daemon's agent socket, optionally as ``uid``.

    The uid is dropped with subprocess's own user/group arguments, never a
    preexec_fn: running Python in the forked child runs grpcio's at-fork hooks
    there, and under load its poller aborted the child ("epoll_wait error: Bad
    file descriptor", SIGABRT) before ssh-keygen was even exec'd.
    """
    return subprocess.run(list(cmd), env=ssh_env(d), cwd=cwd, input=stdin,
                          capture_output=True, timeout=30, check=False,
                          user=uid, group=uid, extra_groups=None if uid is None else [])


def audit_records(d: RunningDaemon) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for f in sorted((d.state / "audit").glob("audit-*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


class RawAgentClient:
    """Speaks the agent protocol byte by byte (for messages ssh-add will not send)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(path))

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def reply(self) -> bytes | None:
        """One reply's type+body; None if the daemon closed the connection."""
        head = self._read(4)
        if head is None:
            return None
        (n,) = struct.unpack(">I", head)
        return self._read(n)

    def _read(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()
