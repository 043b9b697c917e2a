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
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from badged.errors import ConfigError
from badged.swtpm import ProvisionedTpm, SwtpmProcess, missing_tooling, provision
from tests.conftest import require_or_skip, short_tmpdir

os.environ.setdefault("TSS2_LOG", "all+none")


class SwtpmInstance(SwtpmProcess):
    """One running swtpm on a private copy of the provisioned state.

    ``kill()`` is SIGKILL (a power cut: unorderly, counts as a DA failure on
    the next startup), ``start()`` brings the same TPM back. The process
    handling is badged.swtpm's, shared with ``badged dev --backend tpm``.
    """

    def __init__(self, base: Path, provisioned: ProvisionedTpm) -> None:
        super().__init__(base / "st", base / "s", base / "swtpm.log")
        self.base = base
        self.key_dir = base / "keys"
        self.provisioned = provisioned
        shutil.copytree(provisioned.state_dir, self.state_dir)
        self.key_dir.mkdir(mode=0o700)

    def esapi(self) -> Any:
        """A separate raw ESAPI connection, for checks behind the store's back."""
        from tpm2_pytss import ESAPI

        return ESAPI(self.tcti)


@pytest.fixture(scope="session")
def swtpm_provisioned(request: pytest.FixtureRequest) -> Iterator[ProvisionedTpm]:
    missing = missing_tooling()
    if missing:
        require_or_skip(request.config, missing)
    base = short_tmpdir("bswp")
    try:
        try:
            provisioned = provision(base)
        except (ConfigError, subprocess.TimeoutExpired) as exc:
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
