"""The wheel and sdist a stranger installs: only badged's packages, typed,
licensed, with the example configs, importable and type-checkable from an
empty virtual environment (with the badgeclient wheel it depends on; that
distribution's own checks are tests/client/test_client_distribution.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _build(kind: str, out: Path, src: Path = ROOT) -> Path:
    code = ("import sys; from setuptools import build_meta as b; "
            f"print(b.build_{kind}(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("wheel", tmp_path_factory.mktemp("whl"))


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        example = zf.read("badged/examples/badged.example.toml").decode()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    # The daemon only: badgeclient and badged_proto are clients/'s distribution.
    assert tops == {"badged"}  # no stray `examples` package
    assert "badged/py.typed" in names
    assert "Requires-Dist: badgeclient[cli]==0.1.0" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    # The shipped example is the documented one, as a file (not a symlink's target path).
    assert example == (ROOT / "docs" / "badged.example.toml").read_text()
    assert "badged/examples/policy.example.toml" in names


def test_sdist_is_complete(tmp_path: Path) -> None:
    sdist = _build("sdist", tmp_path)
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("LICENSE", "README.md", "pyproject.toml", "docs/deploy.md",
                   "docs/threat-model.md", "protos/badged_proto/v1/admin.proto",
                   "packaging/systemd/badged.service", "packaging/sysusers.d/badged.conf",
                   "packaging/tmpfiles.d/badged.conf", ".ci/lock/runtime.txt",
                   "softhsm/softhsm2.conf.in", "daemon/badged/examples/badged.example.toml",
                   "clients/pyproject.toml", "clients/badgeclient/verify.py",
                   "examples/downstream_ci/test_agent.py"):
        assert needed in names, needed
    assert not any(n.endswith(".pin") or "__pycache__" in n for n in names)


def test_installs_into_an_empty_venv_imports_and_type_checks(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    py = target / "bin" / "python"
    client_wheel = _build("wheel", tmp_path, ROOT / "clients")
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps",
                              "--disable-pip-version-check", "--no-index", str(client_wheel),
                              str(wheel)],
                             capture_output=True, text=True, timeout=300, check=False)
    assert install.returncode == 0, install.stderr
    # Dependencies (only) from this checkout's locked venv; badged itself from the wheel.
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "locked-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [str(py), "-c", "import badged, badgeclient, badged_proto.v1.admin_pb2, badged.app; "
                        "print(badged.__file__)"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(target))
    for args, needle in ((["--version"], "0.1.0"), (["example-config"], "[keystore]")):
        out = subprocess.run([str(target / "bin" / "badged"), *args], capture_output=True,
                             text=True, timeout=120, env=env, cwd=tmp_path, check=False)
        assert out.returncode == 0 and needle in out.stdout, out.stderr
    # A user's code type-checks against the installed, typed packages.
    user = tmp_path / "user_code.py"
    user.write_text("from badgeclient import WorkloadClient\n"
                    "from badged_proto.v1 import workload_pb2\n"
                    "def f(c: WorkloadClient) -> str:\n"
                    "    return c.fetch_token(audience='a').token\n"
                    "req: workload_pb2.FetchTokenRequest = workload_pb2.FetchTokenRequest()\n")
    mypy = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--python-executable", str(py),
                           "--no-incremental", "--config-file", os.devnull, str(user)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
                          check=False)
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr
