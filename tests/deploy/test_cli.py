"""badgectl as scripts and operators meet it: --json everywhere (errors too),
exit codes that tell "no permission" from "daemon down", messages that name the
object, and a policy check that reports every error at its real line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from tests.conftest import require_or_skip, short_tmpdir
from tests.e2e.conftest import RunningDaemon, badgectl_cmd, start_daemon

pytestmark = pytest.mark.slow
NOT_YET: set[str] = set()


def _leaves(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    if isinstance(cmd, click.Group):
        if cmd.invoke_without_command:
            yield " ".join(path), cmd
        for name, sub in cmd.commands.items():
            yield from _leaves(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def test_every_command_takes_json() -> None:
    from badgeclient._cli.main import cli

    missing = [name for name, cmd in _leaves(cli)
               if name not in NOT_YET and not any("--json" in p.opts for p in cmd.params)]
    assert not missing


@pytest.fixture(scope="module")
def dev(request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    if shutil.which("softhsm2-util") is None:
        require_or_skip(request.config, "softhsm2-util not installed")
    base = short_tmpdir("bdc")
    os.chmod(base, 0o755)
    d = start_daemon(base / "s")
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def _ctl(d: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(badgectl_cmd(*args), capture_output=True, text=True, timeout=60,
                          env=d.env(), check=False)


@pytest.mark.parametrize("args", [
    ("agent", "list"), ("agent", "show", "demo-agent"), ("approvals",), ("grants", "list"),
    ("delegations", "list"), ("policy", "reload"), ("whoami",), ("jwks",),
    ("token", "--audience", "https://api.example.com"),
])
def test_json_output_parses(dev: RunningDaemon, args: tuple[str, ...]) -> None:
    proc = _ctl(dev, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)


@pytest.mark.parametrize(("args", "message"), [
    (("agent", "show", "nope"), "agent 'nope': not found"),
    (("agent", "create", "demo-agent"), "agent 'demo-agent': already exists"),
    (("approve", "x1"), "approval 'x1': not found"),
    (("grants", "revoke", "g1"), "grant 'g1': not found"),
])
def test_errors_name_the_object_in_text_and_json(dev: RunningDaemon, args: tuple[str, ...],
                                                 message: str) -> None:
    text = _ctl(dev, *args)
    assert text.returncode == 1 and text.stderr.strip() == f"badgectl: {message}"
    as_json = _ctl(dev, *args, "--json")
    assert as_json.returncode == 1 and not as_json.stderr
    err = json.loads(as_json.stdout)["error"]
    assert err["message"] == message and err["exit_code"] == 1 and err["status"]


def test_usage_errors_and_daemon_down_under_json(dev: RunningDaemon, tmp_path: Path) -> None:
    usage = _ctl(dev, "agent", "show", "--json")
    assert usage.returncode == 2 and json.loads(usage.stdout)["error"]["kind"] == "usage"
    down = subprocess.run(badgectl_cmd("whoami", "--json", "--socket", str(tmp_path / "no.sock")),
                          capture_output=True, text=True, timeout=60, env=dev.env(), check=False)
    assert down.returncode == 3 and json.loads(down.stdout)["error"]["kind"] == "unavailable"


def test_admin_socket_without_permission_is_not_daemon_down(dev: RunningDaemon) -> None:
    """As another user (nobody): exit 4 and a message about permission, not exit 3."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run badgectl as nobody")
    from tests.deploy.layout import user_env, user_python

    for p in (dev.state, dev.state / "run"):
        os.chmod(p, 0o755)
    cmd = [user_python(), "-m", "badgeclient._cli.main", "agent", "list",
           "--admin-socket", str(dev.admin)]
    for extra in ((), ("--json",)):
        proc = subprocess.run([*cmd, *extra], user=65534, group=65534, extra_groups=[],
                              capture_output=True, text=True, timeout=60, env=user_env(),
                              check=False, cwd="/")
        assert proc.returncode == 4, proc.stderr + proc.stdout
        out = json.loads(proc.stdout)["error"]["message"] if extra else proc.stderr
        assert f"permission denied on {dev.admin}" in out and "operator_group" in out


POLICY = """[bundle.api]
audiences = ["https://api.example.com"]
scopes = ["read"]

[bundle.api.extra]
foo = 1

[bundle.ok]
audiences = ["https://ok.example.com"]
rate = "lots"

[[agent]]
name = "a"
selectors = ["unix:user:no-such-user-x", "unix:group:no-such-group-x"]
bundles = ["ok"]

[[agent]]
name = "b"
selectors = ["unix:uid:0", "unix:path:/no/such/binary"]
bundles = ["nope"]
"""


def test_policy_check_reports_every_error_at_its_line_and_warns(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(badgectl_cmd("policy", "check", str(path), "--json"),
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    errors = {(e["line"], e["message"].split(":")[0]) for e in report["errors"]}
    # The nested table at its own line (not the parent's, not line 1), then each other error.
    assert (5, "bundle 'api'") in errors and (10, "bundle 'ok'") in errors
    assert any(line == 20 and "#2" in msg for line, msg in errors), errors
    warnings = {(w["line"], w["message"].split(":")[1]) for w in report["warnings"]}
    assert {(14, "user"), (14, "group"), (19, "path")} <= warnings, warnings
    text = subprocess.run(badgectl_cmd("policy", "check", str(path)), capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert f"{path}:5: bundle 'api': unknown key 'extra'" in text.stderr
    assert f"{path}:14: warning: unix:user:no-such-user-x" in text.stderr
