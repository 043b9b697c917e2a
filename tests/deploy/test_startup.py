"""Start-up refusals a new operator runs into, performed for real as a non-root daemon.

Each one must end in one line ``badged: WHAT: why``, exit 2, no traceback,
and leave nothing behind: no socket, no temporary socket name, no device key.
``badged check`` must find the same problems first, offline.
"""

from __future__ import annotations

import grp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from badged.config import ConfigErrors, load_config
from tests.conftest import ROOT
from tests.deploy.layout import Layout, user_env

pytestmark = pytest.mark.slow


def _badged_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("badged: ")]


def _assert_one_line_refusal(proc: subprocess.CompletedProcess[str], needle: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = _badged_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def _assert_nothing_made(lay: Layout, *, state_touched: bool = False) -> None:
    if lay.run_dir.exists():
        assert sorted(os.listdir(lay.run_dir)) == []  # no socket, no .admin.sock.<pid>
    assert not (lay.state / "device-key.pem").exists()  # no key was generated
    assert not (lay.state / "audit").exists()
    if not state_touched:  # refused by the checks, before the state dir was used
        assert not (lay.state / "private").exists()


BAD_TYPES = """[daemon]
state_dir = "/var/lib/b"
[keystore]
uri = "pkcs11:token=t?pin-source=file:/etc/pin"
module_env = { SOFTHSM2_CONF = "/etc/badged/softhsm2.conf", "bad name" = "x" }
[audit]
syslog = "no"
[log]
level = "VERBOSE"
error_details = "false"
format = 1
"""


def test_types_are_strict_and_every_error_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "badged.toml"
    cfg.write_text(BAD_TYPES)
    with pytest.raises(ConfigErrors) as info:
        load_config(cfg)
    found = {(e.line, e.detail.split(": ", 1)[1].split(" ")[0]) for e in info.value.errors}
    assert found == {(5, "module_env:"), (7, "syslog"), (9, "level"), (10, "error_details"),
                     (11, "format")}, info.value.errors
    proc = subprocess.run([sys.executable, "-m", "badged", "check", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 1
    assert len(_badged_lines(proc.stderr)) == 5 and "Traceback" not in proc.stderr
    # The daemon refuses with the first, in one line, and points at `check`.
    proc = subprocess.run([sys.executable, "-m", "badged", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    line = _assert_one_line_refusal(proc, f"{cfg}:5:")
    assert "4 more errors: badged check" in line


def test_module_env_and_booleans_parse(tmp_path: Path) -> None:
    cfg = tmp_path / "badged.toml"
    cfg.write_text('[keystore]\nuri = "pkcs11:token=t?pin-source=file:/etc/pin"\n'
                   '[keystore.module_env]\nSOFTHSM2_CONF = "/etc/badged/softhsm2.conf"\n'
                   '[audit]\nsyslog = false\n[log]\nerror_details = false\nlevel = "debug"\n')
    c = load_config(cfg)
    assert c.module_env == (("SOFTHSM2_CONF", "/etc/badged/softhsm2.conf"),)
    assert c.audit_syslog is False and c.log_error_details is False and c.log_level == "DEBUG"
    cfg.write_text(cfg.read_text().replace('"/etc/badged/softhsm2.conf"', "5"))
    with pytest.raises(ConfigErrors) as info:
        load_config(cfg)
    assert info.value.line == 4  # the key's own line inside [keystore.module_env]


def test_shipped_example_passes_type_checks() -> None:
    cfg = load_config(ROOT / "docs" / "badged.example.toml")
    assert cfg.log_level == "INFO" and cfg.audit_syslog is False


def test_check_passes_on_the_documented_layout_and_logs_in(layout: Layout) -> None:
    proc = layout.user.run(layout.badged("check", "--config", str(layout.config), "--online"),
                           env=user_env())
    assert proc.returncode == 0, proc.stderr
    assert "login OK" in proc.stdout and f"{layout.user.name}" in proc.stdout


def test_check_finds_host_problems_offline(layout: Layout) -> None:
    os.chmod(layout.pin, 0o640)
    layout.write_config(operator_group='"no-such-group-x"')
    cfg = layout.config.read_text().replace(layout.module, "/usr/lib/nope/libnope.so")
    layout.config.write_text(cfg)
    os.chown(layout.run_dir, 0, 0)  # as if RuntimeDirectory= were missing from the unit
    os.chmod(layout.etc / "policy.toml", 0o666)
    proc = layout.user.run(layout.badged("check", "--config", str(layout.config)), env=user_env())
    assert proc.returncode == 1
    out = proc.stderr
    assert "PIN file mode 0640 is too open" in out
    assert "PKCS#11 module not found: /usr/lib/nope/libnope.so" in out
    assert "group 'no-such-group-x' does not exist" in out
    assert f"{layout.run_dir} is owned by uid 0" in out and "Traceback" not in out
    assert "policy.toml has mode 0666: any local user can rewrite it" in out


def test_missing_module_env_is_named(layout: Layout) -> None:
    """Without SOFTHSM2_CONF, SoftHSM reads the shared default the daemon's user cannot use."""
    layout.config.write_text("\n".join(line for line in layout.config.read_text().splitlines()
                                       if not line.startswith("module_env")) + "\n")
    proc = layout.user.run(layout.badged("check", "--config", str(layout.config)), env=user_env())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "[keystore] module_env: SoftHSM" in proc.stderr and "SOFTHSM2_CONF" in proc.stderr


def test_wrong_pin_names_token_and_pin_file_and_warns(layout: Layout) -> None:
    layout.pin.write_text("0000-wrong\n")
    proc = layout.user.run(layout.badged("check", "--config", str(layout.config), "--online"),
                           env=user_env())
    assert proc.returncode == 1
    for needle in ("token login failed", "pkcs11:token=badged", str(layout.pin), "lock a real token"):
        assert needle in proc.stderr, proc.stderr
    proc = layout.user.run(layout.badged("--config", str(layout.config)), env=user_env())
    line = _assert_one_line_refusal(proc, "token login failed")
    assert str(layout.pin) in line and "restart loop" in line and "0000-wrong" not in proc.stderr
    _assert_nothing_made(layout, state_touched=True)


def test_missing_run_dir_is_refused_before_any_key(layout: Layout) -> None:
    layout.run_dir.rmdir()  # /run/badged gone (no RuntimeDirectory=), /run not writable
    proc = layout.user.run(layout.badged("--config", str(layout.config)), env=user_env())
    line = _assert_one_line_refusal(proc, "workload_socket")
    assert "RuntimeDirectory=badged" in line
    _assert_nothing_made(layout)


def test_operator_group_without_membership_leaves_no_sockets(layout: Layout) -> None:
    """The daemon's user is not in operator_group: refused, and no agent.sock or
    .admin.sock.<pid> is left behind (issue 17)."""
    group = f"{layout.user.name}-ops"
    subprocess.run(["groupadd", "--system", group], check=True)
    try:
        layout.write_config(operator_group=f'"{group}"')
        proc = layout.user.run(layout.badged("--config", str(layout.config)), env=user_env())
        line = _assert_one_line_refusal(proc, "operator_group")
        assert "not a member" in line
        _assert_nothing_made(layout)
        # With membership (SupplementaryGroups= in the unit) the same config passes.
        gid = grp.getgrnam(group).gr_gid
        ok = layout.user.run(layout.badged("check", "--config", str(layout.config)),
                             groups=[gid], env=user_env())
        assert ok.returncode == 0, ok.stderr
    finally:
        subprocess.run(["groupdel", group], check=False)


def test_check_on_a_tpm_config_names_the_device(tmp_path: Path) -> None:
    cfg = tmp_path / "badged.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\nworkload_socket = "{tmp_path}/a.sock"\n'
                   f'admin_socket = "{tmp_path}/b.sock"\n[keystore]\nbackend = "tpm"\n'
                   'tcti = "device:/dev/no-such-tpm"\n')
    proc = subprocess.run([sys.executable, "-m", "badged", "check", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "[keystore] tcti: TPM device /dev/no-such-tpm does not exist" in proc.stderr


def test_check_reports_every_policy_error_at_its_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[bundle.a]\naudiences = ["x"]\n\n[bundle.a.nested]\nk = 1\n\n'
                      '[bundle.b]\naudiences = ["y"]\nrate = "lots"\n\n'
                      '[[agent]]\nname = "n"\nselectors = ["unix:user:no-such-user-q"]\n'
                      'bundles = ["b"]\n')
    cfg = tmp_path / "badged.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\npolicy_file = "{policy}"\n'
                   '[keystore]\nuri = "pkcs11:token=t?pin-source=file:/nonexistent/pin"\n')
    proc = subprocess.run([sys.executable, "-m", "badged", "check", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{policy}:4: bundle 'a': unknown key 'nested'" in proc.stderr  # not line 1
    assert f"{policy}:9: bundle 'b'" in proc.stderr
    assert f"warning: [daemon] policy_file: {policy}:13: unix:user:no-such-user-q" in proc.stderr
