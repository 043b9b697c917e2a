"""swtpm fixtures: one provisioned TPM per session, a private copy per test.

Registered suite-wide through ``pytest_plugins`` so the shared contract suite
(tests/contract) can ask for ``tpm_store`` as well as tests/tpm.

* Provisioning (EK + EK certificates + platform certificate, signed by a
  throwaway local CA) costs ~1.5 s, so it runs once; each test then copies the
  state directory (~10 KB) and starts its own swtpm (~5 ms), so no test sees
  another's keys, DA counter or lockout.
* swtpm's own config files are written into the temp dir: the system ones
  under /etc point the local CA at /var/lib, which we must not touch.
* Paths are short /tmp dirs: Unix socket paths are limited to 108 bytes and a
  comma would break swtpm's option parsing (FINDINGS §3), so pytest's
  ``tmp_path`` is not usable here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_or_skip, short_tmpdir

os.environ.setdefault("TSS2_LOG", "all+none")

_TCTI_LIBS = (
    "/usr/lib/x86_64-linux-gnu/libtss2-tcti-swtpm.so.0",
    "/usr/lib/aarch64-linux-gnu/libtss2-tcti-swtpm.so.0",
    "/usr/lib/libtss2-tcti-swtpm.so.0",
    "/usr/local/lib/libtss2-tcti-swtpm.so.0",
)


@dataclass(frozen=True)
class ProvisionedTpm:
    """A manufactured swtpm state plus the local CA that signed its EK certs."""

    state_dir: Path
    root_ca_cert: Path
    issuer_cert: Path


class SwtpmInstance:
    """One running swtpm on a private copy of the provisioned state.

    ``kill()`` is SIGKILL (a power cut: unorderly, counts as a DA failure on
    the next startup), ``start()`` brings the same TPM back.
    """

    def __init__(self, base: Path, provisioned: ProvisionedTpm) -> None:
        self.base = base
        self.state_dir = base / "st"
        self.sock = base / "s"
        self.key_dir = base / "keys"
        self.provisioned = provisioned
        self.proc: subprocess.Popen[bytes] | None = None
        shutil.copytree(provisioned.state_dir, self.state_dir)
        self.key_dir.mkdir(mode=0o700)

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.sock}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "swtpm already running"
        for stale in (self.sock, Path(f"{self.sock}.ctrl")):
            stale.unlink(missing_ok=True)
        log = open(self.base / "swtpm.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2",
             "--server", f"type=unixio,path={self.sock}",
             "--ctrl", f"type=unixio,path={self.sock}.ctrl",
             "--flags", "not-need-init,startup-clear",
             "--tpmstate", f"dir={self.state_dir}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"swtpm exited with {self.proc.returncode}: "
                                   f"{(self.base / 'swtpm.log').read_text()[-500:]}")
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
        raise RuntimeError("swtpm did not come up within 5 s")

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

    def restart(self) -> None:
        self.stop()
        self.start()

    def esapi(self) -> Any:
        """A separate raw ESAPI connection, for checks behind the store's back."""
        from tpm2_pytss import ESAPI

        return ESAPI(self.tcti)


def _provision(base: Path) -> ProvisionedTpm:
    state, ca = base / "tmpl", base / "ca"
    state.mkdir()
    ca.mkdir()
    localca = shutil.which("swtpm_localca") or "/usr/bin/swtpm_localca"
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
    result = subprocess.run(
        ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
         "--create-platform-cert", "--config", str(base / "swtpm_setup.conf"),
         "--logfile", str(base / "setup.log")],
        capture_output=True, timeout=60, check=False,
    )
    if result.returncode != 0:
        log = (base / "setup.log").read_text(errors="replace")[-800:]
        raise RuntimeError(f"swtpm_setup failed ({result.returncode}): {log}")
    return ProvisionedTpm(state_dir=state, root_ca_cert=ca / "swtpm-localca-rootca-cert.pem",
                          issuer_cert=ca / "issuercert.pem")


def _missing_tpm_tooling() -> str | None:
    for tool in ("swtpm", "swtpm_setup", "swtpm_localca"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/bin/{tool}"):
            return f"{tool} not installed (apt-get install swtpm swtpm-tools)"
    if not any(os.path.exists(p) for p in _TCTI_LIBS):
        return "libtss2-tcti-swtpm.so.0 not found (apt-get install libtss2-dev)"
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError as exc:
        return f"tpm2-pytss not importable ({exc}); pip install '.[tpm]'"
    return None


@pytest.fixture(scope="session")
def swtpm_provisioned(request: pytest.FixtureRequest) -> Iterator[ProvisionedTpm]:
    missing = _missing_tpm_tooling()
    if missing:
        require_or_skip(request.config, missing)
    base = short_tmpdir("bswp")
    try:
        try:
            provisioned = _provision(base)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            require_or_skip(request.config, f"cannot provision swtpm: {exc}")
        yield provisioned
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def swtpm_instance(swtpm_provisioned: ProvisionedTpm) -> Iterator[SwtpmInstance]:
    base = short_tmpdir("btp")
    instance = SwtpmInstance(base, swtpm_provisioned)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tpm_store(swtpm_instance: SwtpmInstance) -> Iterator[Any]:
    """A TpmKeyStore on this test's own swtpm (typed Any: tpm2-pytss is optional)."""
    from badged.keystore.tpm.store import TpmConfig, TpmKeyStore

    store = TpmKeyStore.from_config(TpmConfig(tcti=swtpm_instance.tcti,
                                              key_dir=str(swtpm_instance.key_dir)))
    try:
        yield store
    finally:
        store.close()
