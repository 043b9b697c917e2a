"""badgeclient as its own distribution: built from clients/, installed alone
into an empty venv (offline: --no-index --no-deps), it verifies a real token
from a real daemon with nothing of the daemon importable.

The empty venv gets the client's declared dependencies -- and only those,
with their own requirements, as the installed metadata of this checkout's
locked venv lists them -- through a directory of symlinks, so the test needs
no network and no wheel cache, and would fail if badgeclient imported a
package it does not declare (badged, hpack, orjson, pkcs11, ...).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from badgeclient.pytest_plugin import start_badged_dev
from tests.conftest import ROOT
from tests.e2e.conftest import softhsm_available

__all__ = ["softhsm_available"]

CLIENT = ROOT / "clients"


def _versions() -> tuple[str, str, list[str]]:
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    daemon = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return client["version"], daemon["version"], daemon["dependencies"]


def test_versioned_with_the_daemon_and_depended_on_not_depending() -> None:
    client, daemon, deps = _versions()
    assert client == daemon
    assert f"badgeclient[cli]=={daemon}" in deps
    declared = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(re.split(r"[<>=\[]", d)[0] for d in declared) == ["cryptography", "grpcio", "protobuf"]


def _closure(names: list[str]) -> set[str]:
    """The distributions ``names`` need, recursively (unconditional requirements only)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for req in md.requires(name) or []:
            if "extra ==" in req or "platform_python_implementation == \"PyPy\"" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def _link_dists(names: set[str], into: Path) -> None:
    """Symlink the files' top-level entries of these installed distributions into ``into``."""
    into.mkdir()
    for name in names:
        dist = md.distribution(name)
        for f in dist.files or ():
            top = f.parts[0]
            src = Path(str(dist.locate_file(top)))
            if top.endswith(".dist-info") or top == ".." or not src.exists():
                continue
            dst = into / top
            if not dst.exists():
                dst.symlink_to(src)


@pytest.mark.softhsm
@pytest.mark.slow
def test_fresh_venv_with_only_badgeclient_verifies_a_token(tmp_path: Path,
                                                           softhsm_available: None) -> None:
    build = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                               "print(b.build_wheel(sys.argv[1]))", str(tmp_path)],
        cwd=CLIENT, capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = tmp_path / build.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names if ".dist-info" not in n} == {"badgeclient", "badged_proto"}
    assert "badgeclient/py.typed" in names and "badged_proto/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "badgeclient.pytest_plugin = badgeclient.pytest_plugin" in entry_points
    assert "badgectl = badgeclient._cli.main:main" in entry_points
    required = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(r.split(">")[0] for r in required) == ["cryptography", "grpcio", "protobuf"]

    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    py = target / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              "--disable-pip-version-check", str(wheel)],
                             capture_output=True, text=True, timeout=300, check=False)
    assert install.returncode == 0, install.stderr
    deps = tmp_path / "deps"
    _link_dists(_closure(["grpcio", "protobuf", "cryptography"]), deps)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "client-deps.pth").write_text(f"{deps}\n")

    with start_badged_dev(agent="rp-agent") as dev:
        tok = dev.client.fetch_token(audience="https://api.example.com")
        (tmp_path / "jwks.json").write_text(json.dumps(dev.client.jwks()))
    (tmp_path / "token").write_text(tok.token)
    script = tmp_path / "rp.py"
    script.write_text(
        "import json, sys\n"
        "from badgeclient.verify import Verifier\n"
        "import badgeclient, badgeclient.tokensource, badgeclient.session_verify\n"
        "v = Verifier(jwks=json.load(open('jwks.json')))\n"
        "r = v.verify_token(open('token').read(), audience='https://api.example.com')\n"
        "print(r.agent)\n"
        "assert not [m for m in sys.modules if m == 'badged' or m.startswith('badged.')]\n"
        "for absent in ('badged', 'pkcs11', 'hpack', 'orjson', 'click', 'httpx'):\n"
        "    try:\n"
        "        __import__(absent)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise SystemExit(absent + ' is importable in the client-only venv')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(py), str(script)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "spiffe://example.org/agent/rp-agent"

    # badgeclient[cli]: badgectl verifies without the daemon, and says so for what needs it.
    cli_deps = tmp_path / "cli-deps"
    _link_dists(_closure(["click", "grpcio-health-checking", "prometheus-client"]), cli_deps)
    Path(site, "client-cli-deps.pth").write_text(f"{cli_deps}\n")
    ctl = str(target / "bin" / "badgectl")
    ok = subprocess.run([ctl, "verify", "--jwks", "jwks.json", "--audience", "https://api.example.com",
                         tok.token], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        env=env, check=False)
    assert ok.returncode == 0 and "rp-agent" in ok.stdout, ok.stdout + ok.stderr
    (tmp_path / "policy.toml").write_text("")
    needs = subprocess.run([ctl, "policy", "check", "policy.toml"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env=env, check=False)
    assert needs.returncode == 2 and "badged" in needs.stderr, needs.stderr


def test_the_lock_never_takes_badgeclient_from_a_registry() -> None:
    """Dependency confusion: anyone can publish a package named ``badgeclient``. The lock
    must not pin one (it would be fetched by name and hash from the index), and the refresh
    must resolve the name from ./clients."""
    for lock in sorted((ROOT / ".ci" / "lock").glob("*.txt")):
        pinned = [line for line in lock.read_text().splitlines()
                  if re.match(r"^badgeclient\b", line.strip())]
        assert not pinned, (lock.name, pinned)
    refresh = (ROOT / ".ci" / "lock" / "refresh").read_text()
    assert 'badgeclient @ file://$PWD/clients' in refresh
    assert "--no-emit-package badgeclient" in refresh
    setup = (ROOT / ".ci" / "setup").read_text()
    assert setup.index("-e clients") < setup.index("-e . ")
