"""The production layout of docs/deploy.md, built for real under a temporary root.

``/etc/badged``, ``/var/lib/badged`` and ``/run/badged`` become
``ROOT/etc/badged`` etc., so parallel test runs never touch the host's; the
owners, groups and modes are the documented ones. The daemon runs as a
dedicated system user created for the test (root only) and removed after.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import ROOT, short_tmpdir

SITE = sysconfig.get_paths()["purelib"]


def _world_executable(path: str) -> bool:
    """Can an unprivileged user exec ``path``? (every directory o+x, file o+x)."""
    real = Path(os.path.realpath(path))
    return all(os.stat(part).st_mode & 0o001 for part in [real, *real.parents])


def user_python() -> str:
    """An interpreter another user can run, with this venv's packages on PYTHONPATH.

    The venv's own python may sit under a 0700 home (pyenv in /root); the
    system python of the same minor version loads the same wheels.
    """
    if _world_executable(sys.executable):
        return sys.executable
    candidate = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if os.path.exists(candidate) and _world_executable(candidate):
        return candidate
    pytest.skip(f"no python{sys.version_info.major}.{sys.version_info.minor} that other users "
                "can execute")


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "daemon"), str(ROOT / "clients"), SITE])
    env["HOME"] = "/"
    env.update(extra)
    return env


@dataclass
class SystemUser:
    name: str
    uid: int
    gid: int

    def run(self, args: Sequence[str], *, groups: Sequence[int] = (),
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), user=self.uid, group=self.gid, extra_groups=list(groups),
                              capture_output=True, text=True, timeout=60, check=False, env=env,
                              cwd="/")

    def popen(self, args: Sequence[str], *, env: dict[str, str], stdout: int,
              stderr: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(list(args), user=self.uid, group=self.gid, extra_groups=[],
                                env=env, stdout=stdout, stderr=stderr, cwd="/")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a system user for the daemon")
    if shutil.which("useradd") is None or shutil.which("softhsm2-util") is None:
        pytest.skip("needs useradd and softhsm2-util")


def make_user(name: str) -> Iterator[SystemUser]:
    """``useradd --system`` like packaging/sysusers.d/badged.conf; removed after."""
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        pw = pwd.getpwnam(name)
        yield SystemUser(name, pw.pw_uid, pw.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False)
        try:
            grp.getgrnam(name)
            subprocess.run(["groupdel", name], check=False)
        except KeyError:
            pass


@dataclass
class Layout:
    root: Path
    user: SystemUser
    module: str

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "badged"

    @property
    def state(self) -> Path:
        return self.root / "var" / "lib" / "badged"

    @property
    def run_dir(self) -> Path:
        return self.root / "run" / "badged"

    @property
    def config(self) -> Path:
        return self.etc / "badged.toml"

    @property
    def pin(self) -> Path:
        return self.etc / "user.pin"

    @property
    def softhsm_conf(self) -> Path:
        return self.etc / "softhsm2.conf"

    def badged(self, *args: str) -> list[str]:
        return [user_python(), "-m", "badged", *args]

    def write_config(self, **daemon_extra: str) -> None:
        extra = "".join(f"{k} = {v}\n" for k, v in daemon_extra.items())
        self.config.write_text(f"""[daemon]
state_dir = "{self.state}"
workload_socket = "{self.run_dir}/agent.sock"
admin_socket = "{self.run_dir}/admin.sock"
policy_file = "{self.etc}/policy.toml"
trust_domain = "example.org"
{extra}
[keystore]
backend = "pkcs11"
uri = "pkcs11:token=badged?pin-source=file:{self.pin}"
module_path = "{self.module}"
module_env = {{ SOFTHSM2_CONF = "{self.softhsm_conf}" }}

[log]
format = "text"
level = "INFO"
""")
        os.chmod(self.config, 0o640)
        os.chown(self.config, 0, self.user.gid)


def build_layout(user: SystemUser) -> Iterator[Layout]:
    """The steps of docs/deploy.md ("SoftHSM token"), as root, with the documented modes."""
    from badged.softhsm import find_module

    base = short_tmpdir("bdl")
    os.chmod(base, 0o755)
    lay = Layout(base, user, find_module())
    try:
        lay.etc.mkdir(parents=True)
        os.chown(lay.etc, 0, user.gid)
        os.chmod(lay.etc, 0o750)
        # StateDirectory=badged / RuntimeDirectory=badged (tmpfiles.d when not under systemd)
        for path, mode in ((lay.state, 0o750), (lay.run_dir, 0o755)):
            path.mkdir(parents=True)
            os.chown(path, user.uid, user.gid)
            os.chmod(path, mode)
        tokens = lay.state / "softhsm" / "tokens"
        tokens.mkdir(parents=True)
        for path in (tokens.parent, tokens):
            os.chown(path, user.uid, user.gid)
            os.chmod(path, 0o700)
        lay.softhsm_conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                                    "log.level = ERROR\nslots.removable = false\n")
        os.chmod(lay.softhsm_conf, 0o640)
        os.chown(lay.softhsm_conf, 0, user.gid)
        pin = secrets.token_hex(16)
        lay.pin.write_text(pin + "\n")
        os.chown(lay.pin, user.uid, user.gid)
        os.chmod(lay.pin, 0o600)
        init = user.run(["softhsm2-util", "--init-token", "--free", "--label", "badged",
                         "--pin", pin, "--so-pin", secrets.token_hex(16)],
                        env={"SOFTHSM2_CONF": str(lay.softhsm_conf), "PATH": os.environ["PATH"]})
        assert init.returncode == 0, init.stderr
        (lay.etc / "policy.toml").write_text(
            '[bundle.web]\naudiences = ["https://api.example.com"]\nscopes = ["read"]\n'
            'kinds = ["token"]\nmax_ttl = "5m"\n\n'
            '[[agent]]\nname = "web-agent"\nselectors = ["unix:uid:65534"]\nbundles = ["web"]\n')
        os.chown(lay.etc / "policy.toml", 0, user.gid)
        os.chmod(lay.etc / "policy.toml", 0o640)
        lay.write_config()
        yield lay
    finally:
        shutil.rmtree(base, ignore_errors=True)
