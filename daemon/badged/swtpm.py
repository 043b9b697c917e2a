"""Provision and run a throwaway software TPM (swtpm) for dev mode and the tests.

Mirrors :mod:`badged.softhsm`: ``badged dev --backend tpm`` and the test
fixtures (tests/tpm_fixtures.py) share this code, so what a newcomer runs is
what CI tests. Recipes and pitfalls are in FINDINGS §3:

* ``swtpm_setup`` manufactures the TPM (EK, EK certificates in NV, platform
  certificate) once, ~1-2 s, signed by a local CA whose config we write
  ourselves -- the system one under /etc points at /var/lib, which a dev
  daemon or a test must not touch;
* Unix socket paths are limited to 108 bytes and a comma breaks swtpm's
  option parsing, so both are refused here with a clear message instead of a
  cryptic swtpm failure;
* the TCTI ``swtpm:path=S`` expects the control socket at ``S.ctrl``.

Never for production: swtpm keeps its secrets in ordinary files.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from badged.errors import ConfigError

TCTI_LIBS = (
    "/usr/lib/x86_64-linux-gnu/libtss2-tcti-swtpm.so.0",
    "/usr/lib/aarch64-linux-gnu/libtss2-tcti-swtpm.so.0",
    "/usr/lib/libtss2-tcti-swtpm.so.0",
    "/usr/local/lib/libtss2-tcti-swtpm.so.0",
)
_STATE_FILE = "tpm2-00.permall"
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; leave room for ".ctrl" and the NUL
_PR_SET_PDEATHSIG = 1
_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProvisionedTpm:
    """A manufactured swtpm state plus the local CA that signed its EK certs."""

    state_dir: Path
    root_ca_cert: Path
    issuer_cert: Path


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.path.exists(f"/usr/bin/{name}"):
        found = f"/usr/bin/{name}"
    return found


def missing_tooling() -> str | None:
    """Why swtpm cannot be used here (with the install hint), or None."""
    for tool in ("swtpm", "swtpm_setup", "swtpm_localca"):
        if _tool(tool) is None:
            return f"{tool} not installed (apt-get install swtpm swtpm-tools)"
    if not any(os.path.exists(p) for p in TCTI_LIBS):
        return "libtss2-tcti-swtpm.so.0 not found (apt-get install libtss2-dev)"
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError as exc:
        return f"tpm2-pytss not importable ({exc}); pip install '.[tpm]'"
    return None


def _check_option_path(path: Path) -> None:
    if "," in str(path):
        raise ConfigError("swtpm cannot use a path containing a comma", path=str(path))


def provision(base: Path) -> ProvisionedTpm:
    """Manufacture a TPM under ``base`` (state in ``base/state``, CA in ``base/ca``).

    Idempotent: an already manufactured state is reused, so a dev daemon keeps
    its TPM -- and the key files made under it -- across restarts.
    """
    state, ca = base / "state", base / "ca"
    result = ProvisionedTpm(state_dir=state, root_ca_cert=ca / "swtpm-localca-rootca-cert.pem",
                            issuer_cert=ca / "issuercert.pem")
    if (state / _STATE_FILE).exists():
        return result
    missing = missing_tooling()
    if missing:
        raise ConfigError(missing)
    _check_option_path(base)
    for d in (base, state, ca):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    localca = _tool("swtpm_localca") or "/usr/bin/swtpm_localca"
    (base / "swtpm_setup.conf").write_text(
        f"create_certs_tool = {localca}\n"
        f"create_certs_tool_config = {base}/swtpm-localca.conf\n"
        f"create_certs_tool_options = {base}/swtpm-localca.options\n"
        "active_pcr_banks = sha256\n")
    (base / "swtpm-localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n")
    (base / "swtpm-localca.options").write_text(
        "--platform-manufacturer badged\n--platform-version 2.1\n--platform-model swtpm\n")
    proc = subprocess.run(
        ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
         "--create-platform-cert", "--config", str(base / "swtpm_setup.conf"),
         "--logfile", str(base / "setup.log")],
        capture_output=True, timeout=60, check=False,
    )
    if proc.returncode != 0:
        log = (base / "setup.log").read_text(errors="replace")[-800:]
        raise ConfigError(f"swtpm_setup failed ({proc.returncode}): {log}")
    return result


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the daemon dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class SwtpmProcess:
    """One ``swtpm socket`` serving ``state_dir`` on ``sock`` (+ ``sock.ctrl``).

    ``kill()`` is SIGKILL (a power cut: counts as a DA failure at the next
    start, which badged's noDA keys do not mind), ``stop()`` is SIGTERM.
    With ``die_with_parent`` the kernel stops swtpm if the process that
    started it dies, so a killed dev daemon leaves no swtpm behind.
    """

    def __init__(self, state_dir: Path, sock: Path, log_path: Path, *,
                 die_with_parent: bool = False) -> None:
        if len(str(sock).encode()) + len(".ctrl") >= MAX_SOCKET_PATH:
            raise ConfigError("swtpm socket path too long for a Unix socket", path=str(sock))
        for p in (state_dir, sock):
            _check_option_path(p)
        self.state_dir = state_dir
        self.sock = sock
        self.log_path = log_path
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.sock}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 5.0) -> None:
        if self.running:
            raise RuntimeError("swtpm already running")
        if _serving(self.sock):
            # Someone else's live swtpm (another daemon's): never take its socket.
            raise ConfigError("a swtpm is already serving this socket", path=str(self.sock))
        for stale in (self.sock, Path(f"{self.sock}.ctrl")):
            stale.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2",
                 "--server", f"type=unixio,path={self.sock}",
                 "--ctrl", f"type=unixio,path={self.sock}.ctrl",
                 "--flags", "not-need-init,startup-clear",
                 "--tpmstate", f"dir={self.state_dir}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-500:]
                raise ConfigError(f"swtpm exited with {self.proc.returncode}: {tail}")
            if self.sock.exists():
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(self.sock))
                    return
                except OSError:
                    pass
                finally:
                    probe.close()
            time.sleep(0.005)
        self.kill()
        raise ConfigError(f"swtpm did not come up within {timeout:g} s", path=str(self.sock))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for leftover in (self.sock, Path(f"{self.sock}.ctrl")):
            leftover.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()


def _serving(sock: Path) -> bool:
    """Whether something accepts connections on ``sock`` now."""
    if not sock.exists():
        return False
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.settimeout(1.0)
        probe.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class SwtpmSupervisor:
    """Restarts a dev swtpm that died, for as long as its daemon runs.

    ``badged dev --backend tpm`` owns its swtpm: if it crashes or is killed,
    the daemon's TPM calls fail (UNAVAILABLE, health NOT_SERVING) until a TPM
    answers again, so the supervisor starts it again on the same state --
    after 0.2 s, backing off to 10 s while it keeps dying -- and the key
    store reconnects by itself on its next call or health ping.
    """

    POLL_S = 0.2
    MAX_BACKOFF_S = 10.0

    def __init__(self, swtpm: SwtpmProcess) -> None:
        self._swtpm = swtpm
        self._stop = threading.Event()
        self.restarts = 0
        self._thread = threading.Thread(target=self._main, name="badged-swtpm-supervisor",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising (before stopping swtpm itself)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.MAX_BACKOFF_S + 6)

    def _main(self) -> None:
        backoff, started = self.POLL_S, time.monotonic()
        while not self._stop.wait(self.POLL_S):
            proc = self._swtpm.proc
            if proc is None or proc.poll() is None:
                continue
            # Dying again right after a start: back off; else restart quickly.
            recent = time.monotonic() - started < 5
            backoff = min(backoff * 2, self.MAX_BACKOFF_S) if recent else self.POLL_S
            _logger.warning("dev swtpm exited (status %s); restarting in %.1f s",
                            proc.returncode, backoff)
            if self._stop.wait(backoff):
                return
            started = time.monotonic()
            try:
                self._swtpm.start()
            except (ConfigError, OSError) as exc:
                _logger.error("dev swtpm restart failed: %s", exc)
                continue
            self.restarts += 1
            _logger.warning("dev swtpm restarted")
