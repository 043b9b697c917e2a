"""Suite-wide fixtures: real SoftHSM tokens, markers, and backend requirements.

Infrastructure that is missing gives a *skip with a reason*, never an import
error -- unless ``--require-backends`` (used by CI) turns those skips into
failures, so a CI run can never silently test nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.tpm_fixtures"]
for sub in ("daemon", "clients"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-backends", action="store_true", default=False,
        help="fail (instead of skip) when SoftHSM or swtpm is missing",
    )


def require_or_skip(config: pytest.Config, reason: str) -> NoReturn:
    if config.getoption("--require-backends"):
        pytest.fail(f"required backend missing: {reason}")
    pytest.skip(reason)


def short_tmpdir(prefix: str) -> Path:
    """Unix socket paths are limited to 108 bytes: keep them under /tmp."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="session")
def softhsm_token(request: pytest.FixtureRequest) -> Iterator[object]:
    """One real SoftHSM token for the whole session (SOFTHSM2_CONF is per process)."""
    from badged.errors import ConfigError
    from badged.softhsm import provision

    if shutil.which("softhsm2-util") is None:
        require_or_skip(request.config, "softhsm2-util not installed")
    base = short_tmpdir("bsh")
    try:
        token = provision(base / "hsm", label="badged-test")
    except ConfigError as exc:
        require_or_skip(request.config, str(exc))
    os.environ["SOFTHSM2_CONF"] = str(token.conf_path)
    yield token
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pkcs11_store(softhsm_token: object) -> Iterator[object]:
    """The process-wide Pkcs11KeyStore on the session token (one login per process)."""
    from badged.keystore.pkcs11.store import Pkcs11Config, Pkcs11KeyStore
    from badged.softhsm import SoftHsmToken

    assert isinstance(softhsm_token, SoftHsmToken)
    store = Pkcs11KeyStore.from_config(
        Pkcs11Config(uri=softhsm_token.uri(), module_path=softhsm_token.module_path)
    )
    yield store
    store.close()
