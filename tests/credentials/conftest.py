"""A real ``badged dev`` (SoftHSM, real sockets) with a policy that allows the
credential kinds, plus helpers to run the new badgectl commands as processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon, softhsm_available, start_daemon

__all__ = ["softhsm_available"]

AS_TOKEN = "https://as.example.com/token"
AS_ISSUER = "https://as.example.com"
RS = "https://rs.example.com"
AGENT = "demo-agent"
REV_AGENT = "rev-agent"
CLIENT_ID = "oauth-client-1"  # listed for AGENT in the policy: the one foreign id it may use


def policy(uid: int, gid: int) -> str:
    return f"""
[bundle.creds]
audiences = ["{AS_TOKEN}", "{AS_ISSUER}", "{RS}", "demo"]
scopes = ["read"]
kinds = ["token", "sign", "assertion", "dpop", "csr"]
max_ttl = "1h"

[bundle.tokens-only]
audiences = ["demo"]
kinds = ["token"]
max_ttl = "5m"

[[agent]]
name = "{AGENT}"
selectors = ["unix:uid:{uid}"]
bundles = ["creds"]
client_ids = ["{CLIENT_ID}"]

[[agent]]
name = "{REV_AGENT}"
selectors = ["unix:uid:{uid}", "unix:gid:{gid}"]
bundles = ["creds"]

[[agent]]
name = "plain-agent"
selectors = ["unix:uid:{uid}", "unix:user:{_user(uid)}"]
bundles = ["tokens-only"]
"""


def _user(uid: int) -> str:
    import pwd

    return pwd.getpwuid(uid).pw_name


def ctl(module: str, obj: str, *args: str, env: dict[str, str] | None = None,
        check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one of this issue's badgectl click commands in its own process.

    Until they are registered in badgectl's main, call them by module.
    """
    code = (f"from badgeclient._cli.{module} import {obj} as c; "
            f"c.main(prog_name='badgectl', standalone_mode=True)")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, check=check, input=input, timeout=60)


@pytest.fixture(scope="module")
def cred_daemon(softhsm_available: None) -> Iterator[RunningDaemon]:
    base = short_tmpdir("bcr")
    os.chmod(base, 0o755)
    state = base / "s"
    state.mkdir(mode=0o755)
    (state / "policy.toml").write_text(policy(os.getuid(), os.getgid()))
    d = start_daemon(state)
    try:
        from badgeclient import AdminClient

        with AdminClient(d.admin) as admin:
            for name in (REV_AGENT, "plain-agent"):
                admin.create_agent(name, "credentials e2e")
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def ca_dir(softhsm_available: None) -> Iterator[Path]:
    base = short_tmpdir("bca")
    yield base / "ca"
    shutil.rmtree(base, ignore_errors=True)
