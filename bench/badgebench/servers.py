"""Start and stop the servers under test: ssh-agent, p11-kit server, badged."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from badgebench.provision import Token


class Unavailable(Exception):
    """A path that cannot be measured on this machine; the reason goes in the table."""


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str,
                     timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise Unavailable(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise Unavailable(f"{what} did not create its socket in {timeout:.0f}s")
        time.sleep(0.01)


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[:300]


class SshAgent:
    """OpenSSH's agent with the token loaded through its PKCS#11 provider."""

    def __init__(self, token: Token, name: str = "ssh-agent") -> None:
        self.token = token
        self.name = name
        self.socket = token.state_dir / f"{name}.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for tool in ("ssh-agent", "ssh-add"):
            if not _which(tool):
                raise Unavailable(f"{tool} not installed (apt-get install -y openssh-client)")
        state = self.token.state_dir
        askpass = state / "askpass.sh"
        if not askpass.exists():
            fd = os.open(askpass, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
            with os.fdopen(fd, "w") as fh:  # prints the PIN from its 0600 file, never holds it
                fh.write(f"#!/bin/sh\nexec cat '{self.token.pin_file}'\n")
        log = state / f"{self.name}.log"
        env = dict(os.environ, **self.token.env)
        # -P needs the resolved directory of the module (ssh-agent realpath()s it).
        allow = os.path.dirname(os.path.realpath(self.token.module)) + "/*"
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(self.socket), "-P", allow],
                                         env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=logf)
        _wait_for_socket(self.socket, self.proc, "ssh-agent")
        add = subprocess.run(
            ["ssh-add", "-s", self.token.module], stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=60, check=False,
            env=dict(env, SSH_AUTH_SOCK=str(self.socket), SSH_ASKPASS=str(askpass),
                     SSH_ASKPASS_REQUIRE="force", DISPLAY=os.environ.get("DISPLAY", ":0")))
        if add.returncode != 0:
            raise Unavailable(f"ssh-add -s failed: {(add.stderr or add.stdout).strip()[:200]}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        _stop(self.proc)


class P11KitServer:
    """`p11-kit server` exporting the token on a Unix socket."""

    def __init__(self, token: Token) -> None:
        self.token = token
        self.socket = token.state_dir / "p11kit.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def start(self) -> None:
        if not _which("p11-kit"):
            raise Unavailable("p11-kit not installed (apt-get install -y p11-kit)")
        log = self.token.state_dir / "p11kit.log"
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(
                ["p11-kit", "server", "-f", "-s", "-n", str(self.socket),
                 "--provider", self.token.module, f"pkcs11:token={self.token.label}"],
                env=dict(os.environ, **self.token.env), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=logf)
        try:
            _wait_for_socket(self.socket, self.proc, "p11-kit server")
        except Unavailable as exc:
            raise Unavailable(f"{exc}: {_tail(log)}") from None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        _stop(self.proc)


_COMPILED: set[Path] = set()


def _compile_once(repo: Path) -> None:
    """Byte-compile the daemon's sources once, as ``pip install`` does.

    Started from a source tree with ``PYTHONDONTWRITEBYTECODE`` set (as some
    CI and sandboxes do), Python recompiles every module of the daemon at
    each start: ~270 files, 0.4-1.2 s of a start-up measured here (issue
    22). An installed badged has its .pyc files, so the start-up rows measure
    that. The .pyc files go to ``__pycache__`` (gitignored).
    """
    if repo in _COMPILED:
        return
    _COMPILED.add(repo)
    import compileall

    for sub in ("daemon", "clients"):
        if (repo / sub).is_dir():
            try:
                compileall.compile_dir(repo / sub, quiet=2, workers=0)
            except (OSError, ValueError):  # a read-only tree: it just starts slower
                pass


class Badged:
    """`badged dev --state-dir DIR` on the benchmark's token; times start-up to ready."""

    def __init__(self, state_dir: Path, repo: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir
        self.repo = repo
        self.extra_args = extra_args  # e.g. ("--audit-durability", "write")
        self.socket = state_dir / "run" / "agent.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        # `python -m badged` with the source tree first on PYTHONPATH: the
        # daemon measured is the one in ``repo``, whatever is installed.
        return [sys.executable, "-m", "badged", "dev", "--state-dir", str(self.state_dir),
                *self.extra_args]

    def start(self, timeout: float = 90.0) -> float:
        """Start the daemon; return seconds from exec to its readiness line."""
        _compile_once(self.repo)
        log = self.state_dir / "badged.log"
        self._log = open(log, "ab")  # noqa: SIM115 -- kept open for the daemon's life
        paths = [str(self.repo / "daemon"), str(self.repo / "clients")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=self._log)
        except OSError as exc:
            raise Unavailable(f"cannot run badged: {exc}") from None
        assert self.proc.stdout is not None
        out = self.proc.stdout
        buf = b""
        while b"badged ready" not in buf:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                self.stop()
                raise Unavailable(f"not ready within {timeout:.0f}s: {_tail(log)}")
            ready, _, _ = select.select([out], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    self.proc.wait(5)
                    raise Unavailable(  # the last log line is the exception, if any
                        f"daemon exited with status {self.proc.returncode}: {_tail(log, 1)}")
                buf += chunk
        elapsed = time.monotonic() - t0
        # Drain stdout so the daemon can never block on a full pipe.
        threading.Thread(target=_drain, args=(out,), daemon=True).start()
        return elapsed

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _drain(stream: IO[bytes]) -> None:
    with contextlib.suppress(OSError, ValueError):
        while stream.read(4096):
            pass


def _which(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None
