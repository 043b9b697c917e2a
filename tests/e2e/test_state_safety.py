"""Key and state safety of real daemons under real faults (issue 15, items 1, 2, 6).

Every test runs ``badged dev`` on a real SoftHSM token in real processes and
damages the state the way an operator, a bad restore or an attacker would:
the registry file removed, truncated or made unsaveable (``chattr +i``), a
sealed audit record edited. What must hold: no key is ever destroyed by
start-up, no change takes effect unaudited, an error means nothing changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from badgeclient import AdminClient, UnavailableError, WorkloadClient
from tests.e2e.conftest import _pythonpath, badgectl_cmd, badged_cmd, start_daemon

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def token_labels(state: Path) -> list[str]:
    """Ask SoftHSM directly (separate process) which private keys exist in the dev token."""
    script = f"""
import os, sys, json
sys.path[:0] = {[_pythonpath().split(os.pathsep)[0]]!r}
os.environ['SOFTHSM2_CONF'] = {str(state / 'private/softhsm/softhsm2.conf')!r}
import pkcs11
from badged.softhsm import find_module
pin = open({str(state / 'private/softhsm/user.pin')!r}).read().strip()
tok = pkcs11.lib(find_module()).get_token(token_label='badged-dev')
with tok.open(user_pin=pin) as s:
    objs = s.get_objects({{pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}})
    print(json.dumps(sorted(str(o.label) for o in objs)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    labels: list[str] = json.loads(out.stdout)
    return labels


def audit_records(state: Path) -> list[dict[str, object]]:
    out = subprocess.run(badgectl_cmd("audit", "export", "--dir", str(state / "audit")),
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=_pythonpath()))
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def run_badged(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(badged_cmd(*args), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=_pythonpath()))


def agent_keys(labels: list[str]) -> list[str]:
    return [k for k in labels if k.startswith("badged/agent/")]


@pytest.fixture
def state_with_two_agents(fresh_state: Path) -> Iterator[Path]:
    """demo-agent (v1) and deploy-bot (rotated once: v2), daemon stopped."""
    d = start_daemon(fresh_state)
    try:
        with AdminClient(d.admin) as a:
            a.create_agent("deploy-bot", "ships things")
            a.rotate_agent("deploy-bot")
    finally:
        assert d.stop() == 0
    yield fresh_state


def _refused(state: Path) -> subprocess.CompletedProcess[str]:
    res = run_badged("dev", "--state-dir", str(state))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "badged ready" not in res.stdout
    assert "Traceback" not in res.stderr
    return res


def test_missing_registry_refuses_start_names_keys_and_adopt_brings_them_back(
        state_with_two_agents: Path) -> None:
    state = state_with_two_agents
    keys_before = agent_keys(token_labels(state))
    # With the SSH agent socket on (badged dev), each version has an ssh key too.
    assert keys_before == ["badged/agent/demo-agent/v1/sig", "badged/agent/demo-agent/v1/ssh",
                           "badged/agent/demo-agent/v1/tok", "badged/agent/deploy-bot/v2/sig",
                           "badged/agent/deploy-bot/v2/ssh", "badged/agent/deploy-bot/v2/tok"]
    (state / "private" / "agents.json").unlink()

    res = _refused(state)
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("badged: ")]
    assert line and line[-1].startswith("badged: key store: 6 keys have no registry entry (")
    for key in keys_before:
        assert key in line[-1]
    assert "badged recover" in line[-1]
    # Twice, to be sure a refusal never "half-reconciles".
    _refused(state)
    assert agent_keys(token_labels(state)) == keys_before  # nothing destroyed
    assert not (state / "private" / "agents.json").exists()
    assert any(r["event"] == "daemon.refused" for r in audit_records(state))

    # Report-only recover changes nothing and says start-up would refuse.
    report = run_badged("recover", "--dev", str(state))
    assert report.returncode == 1 and "unregistered" in report.stdout
    adopt = run_badged("recover", "--dev", str(state), "--adopt")
    assert adopt.returncode == 0, adopt.stdout + adopt.stderr
    assert agent_keys(token_labels(state)) == keys_before

    recs = audit_records(state)
    adopted = {r["agent"]: r for r in recs if r["event"] == "agent.adopted"}
    assert set(adopted) == {"demo-agent", "deploy-bot"}
    assert adopted["deploy-bot"]["version"] == 2 and adopted["deploy-bot"]["audit_match"] is True
    # The audited kid of the adopted key is the one rotate recorded.
    rotated = [r for r in recs if r["event"] == "agent.rotated" and r["agent"] == "deploy-bot"]
    assert rotated[-1]["kid"] == adopted["deploy-bot"]["kid"]

    d = start_daemon(state)
    try:
        with AdminClient(d.admin) as a, WorkloadClient(d.workload) as w:
            agents = {x.name: x for x in a.list_agents()}
            assert agents["deploy-bot"].current_version == 2
            assert agents["deploy-bot"].description == "ships things"
            assert w.fetch_token(audience="demo").key_id == adopted["demo-agent"]["kid"]
    finally:
        assert d.stop() == 0
    verify = subprocess.run(badgectl_cmd("audit", "verify", "--dir", str(state / "audit"),
                                         "--pubkey", str(state / "device-key.pem")),
                            capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=_pythonpath()))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_truncated_registry_refuses_and_quarantine_sets_keys_aside(
        state_with_two_agents: Path) -> None:
    state = state_with_two_agents
    path = state / "private" / "agents.json"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    keys_before = agent_keys(token_labels(state))

    res = _refused(state)
    assert "agent registry is corrupt" in res.stderr and "badged recover" in res.stderr
    assert agent_keys(token_labels(state)) == keys_before
    assert path.read_bytes() == data[: len(data) // 2]  # not "repaired" behind our back

    q = run_badged("recover", "--dev", str(state), "--quarantine")
    assert q.returncode == 0, q.stdout + q.stderr
    labels = token_labels(state)
    assert agent_keys(labels) == []
    assert sorted(k for k in labels if k.startswith("badged/quarantine/")) == sorted(
        "badged/quarantine/" + k[len("badged/"):] for k in keys_before)
    moved = list(path.parent.glob("agents.json.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == data[: len(data) // 2]
    recs = audit_records(state)
    assert {r["key"] for r in recs if r["event"] == "key.quarantined"} == set(keys_before)
    assert any(r["event"] == "registry.moved_aside" for r in recs)

    # The daemon starts again: dev makes a fresh demo agent; the old keys stay quarantined.
    d = start_daemon(state)
    try:
        with WorkloadClient(d.workload) as w:
            w.fetch_token(audience="demo")
    finally:
        assert d.stop() == 0
    labels = token_labels(state)
    assert len([k for k in labels if k.startswith("badged/quarantine/")]) == 6
    purge = run_badged("recover", "--dev", str(state), "--purge-quarantine")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not [k for k in token_labels(state) if k.startswith("badged/quarantine/")]
    assert len([r for r in audit_records(state) if r["event"] == "key.destroyed"
                and "purge" in str(r["reason"])]) == 6


def _chattr(flag: str, path: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("chattr not installed")
    res = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"chattr {flag} not supported here: {res.stderr.strip()}")


def test_unsaveable_registry_rotate_fails_and_nothing_changes(fresh_state: Path) -> None:
    """``chattr +i`` makes the registry file immutable, even for root: the save
    (rename over it) fails after the new keys were made. The operator gets an
    error; the old version still signs, the new keys are destroyed (audited),
    no ``agent.rotated`` is recorded; after a restart it is all the same."""
    d = start_daemon(fresh_state)
    registry = fresh_state / "private" / "agents.json"
    private = fresh_state / "private"
    try:
        with AdminClient(d.admin) as a, WorkloadClient(d.workload) as w:
            before = w.fetch_token(audience="demo").key_id
            sig_before = w.sign(b"x").key_id
            jwks_before = w.jwks()
            labels_before = token_labels(fresh_state)
            _chattr("+i", registry)
            try:
                with pytest.raises(UnavailableError, match="nothing changed"):
                    a.rotate_agent("demo-agent")
            finally:
                _chattr("-i", registry)
            assert w.fetch_token(audience="demo").key_id == before
            assert w.sign(b"x").key_id == sig_before
            assert w.jwks() == jwks_before
            assert a.get_agent("demo-agent").current_version == 1
            assert token_labels(fresh_state) == labels_before
            assert not list(private.glob(".agents.json.tmp-*"))
            # The whole private dir immutable: refused before anything starts.
            _chattr("+i", private)
            try:
                with pytest.raises(UnavailableError, match="nothing changed"):
                    a.rotate_agent("demo-agent")
            finally:
                _chattr("-i", private)
            assert w.fetch_token(audience="demo").key_id == before
            recs = audit_records(fresh_state)
            [op] = [r["op"] for r in recs if r["event"] == "agent.rotate.intent"]
            assert [r["event"] for r in recs if r.get("op") == op] == [
                "agent.rotate.intent", "key.created", "key.created", "key.created",
                "agent.rotate.aborted", "key.destroyed", "key.destroyed", "key.destroyed"]
            assert not any(r["event"] == "agent.rotated" for r in recs)
            # And once the disk is writable again, rotation works.
            assert a.rotate_agent("demo-agent").current_version == 2
            assert w.fetch_token(audience="demo").key_id != before
    finally:
        d.stop()
    d2 = start_daemon(fresh_state)
    try:
        with AdminClient(d2.admin) as a:
            assert a.get_agent("demo-agent").current_version == 2
    finally:
        assert d2.stop() == 0


def test_edited_sealed_audit_record_refuses_start_until_moved_aside(fresh_state: Path) -> None:
    d = start_daemon(fresh_state)
    with WorkloadClient(d.workload) as w:
        for _ in range(3):
            w.fetch_token(audience="demo")
    assert d.stop() == 0  # the close checkpoint seals everything
    audit = fresh_state / "audit"
    [log] = sorted(audit.glob("audit-*.jsonl"))
    lines = log.read_bytes().splitlines(keepends=True)
    idx = next(i for i, ln in enumerate(lines) if b'"token.issued"' in ln)
    seq = json.loads(lines[idx])["seq"]
    lines[idx] = lines[idx].replace(b'"demo"', b'"evil"')
    log.write_bytes(b"".join(lines))
    edited = log.read_bytes()
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    pub = str(fresh_state / "device-key.pem")

    res = _refused(fresh_state)
    assert f"(seq {seq})" in res.stderr and "tampering" in res.stderr
    assert f"badged recover --audit-move-aside {seq}" in res.stderr
    assert log.read_bytes() == edited and not list(audit.glob("*.cut-*"))  # nothing cut
    verify = subprocess.run(badgectl_cmd("audit", "verify", "--dir", str(audit), "--pubkey", pub),
                            capture_output=True, text=True, env=env)
    assert verify.returncode == 1

    wrong = run_badged("recover", "--dev", str(fresh_state), "--audit-move-aside", str(seq + 1))
    assert wrong.returncode == 2 and log.read_bytes() == edited
    ok = run_badged("recover", "--dev", str(fresh_state), "--audit-move-aside", str(seq))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    [cut] = list(audit.glob("*.cut-*"))
    assert b'"evil"' in cut.read_bytes()
    recs = audit_records(fresh_state)
    [rec] = [r for r in recs if r["kind"] == "recovery"]
    assert rec["seq"] == seq and rec["sealed"] is True
    assert any(r["event"] == "recover.started" and r["audit_move_aside"] == seq for r in recs)

    d2 = start_daemon(fresh_state)  # starts again
    assert d2.stop() == 0
    # ... but sealed history was lost, and verification says so, for good.
    for extra in ([], ["--pubkey", pub]):
        verify = subprocess.run(badgectl_cmd("audit", "verify", "--dir", str(audit), *extra),
                                capture_output=True, text=True, env=env)
        assert verify.returncode == 1, verify.stdout
        assert "sealed" in verify.stdout + verify.stderr


def test_stale_temporary_sockets_of_dead_daemons_are_removed(fresh_state: Path) -> None:
    import socket

    run = fresh_state / "run"
    run.mkdir(parents=True, mode=0o755)
    os.chmod(fresh_state, 0o755)
    os.chmod(run, 0o755)
    dead = subprocess.Popen(["true"])
    dead.wait()

    def leftover(name: str) -> Path:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(run / name))
        s.close()  # the file stays, like after a kill between bind and rename
        return run / name

    stale = [leftover(f".agent.sock.{dead.pid}"), leftover(f".admin.sock.{dead.pid}")]
    live = leftover(f".agent.sock.{os.getpid()}")  # a live process's: not ours to remove
    d = start_daemon(fresh_state)
    try:
        assert not any(p.exists() for p in stale)
        assert live.exists()
    finally:
        assert d.stop() == 0
    assert sorted(p.name for p in run.iterdir()) == [live.name]


@contextlib.contextmanager
def ext4_loop(where: Path, size_mb: int = 16) -> Iterator[Path]:
    """A real ext4 filesystem on a loop device mounted at ``where`` (skips if we cannot)."""
    if shutil.which("mkfs.ext4") is None or shutil.which("mount") is None:
        pytest.skip("mkfs.ext4/mount not available")
    image = Path(tempfile.mkstemp(prefix="bext4", dir="/tmp")[1])
    try:
        os.truncate(image, size_mb * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        where.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-o", "loop", str(image), str(where)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a loop device here: {res.stderr.strip()}")
        try:
            os.chmod(where, 0o700)
            yield where
        finally:
            subprocess.run(["umount", "-l", str(where)], check=False)
    finally:
        image.unlink(missing_ok=True)


def ext4_shutdown(where: Path) -> None:
    """EXT4_IOC_SHUTDOWN (NOLOGFLUSH): every later write, truncate and fsync fails with EIO,
    as on a disk that died or a filesystem the kernel turned read-only after an error."""
    import fcntl

    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, 0x8004587D, struct.pack("I", 2))
    finally:
        os.close(fd)


def test_sigterm_with_a_poisoned_audit_log_stops_cleanly(fresh_state: Path) -> None:
    fresh_state.mkdir(mode=0o755)
    os.chmod(fresh_state, 0o755)
    with ext4_loop(fresh_state / "audit") as audit:
        d = start_daemon(fresh_state)
        try:
            with WorkloadClient(d.workload) as w:
                w.fetch_token(audience="demo")
                ext4_shutdown(audit)
                with pytest.raises(UnavailableError):
                    w.fetch_token(audience="demo")  # the write fails, the cut-back too: poisoned
                with pytest.raises(UnavailableError):
                    w.fetch_token(audience="demo")  # poisoned: nothing more is issued
        finally:
            rc = d.stop()
        log = d.log_text()
        assert rc == 0, log[-2000:]
        assert "Task exception was never retrieved" not in log
        assert "Traceback" not in log
        assert "daemon.stopped not audited" in log


def test_kill_9_of_the_real_daemon_during_admin_changes(fresh_state: Path) -> None:
    """The real daemon, SIGKILLed while an operator creates/rotates/revokes over the
    admin socket: every restart succeeds (never refused, nothing destroyed that the
    registry names) and the invariants of tests/e2e/state_checks.py hold."""
    import random
    import signal
    import threading

    from badgeclient import BadgeError
    from tests.e2e.state_checks import check_restart_invariants

    rng = random.Random(15)
    n = 0
    for _ in range(5):
        d = start_daemon(fresh_state)
        check_restart_invariants(fresh_state, {"labels": token_labels(fresh_state),
                                               "kids": {}})
        stop = threading.Event()

        def churn(admin: Path, stop: threading.Event) -> None:
            nonlocal n
            try:
                with AdminClient(admin) as a:
                    while not stop.is_set():
                        n += 1
                        names = [x.name for x in a.list_agents()]
                        roll = rng.random()
                        if roll < 0.35 or len(names) < 3:
                            a.create_agent(f"k{n}")
                        elif roll < 0.8:
                            a.rotate_agent(rng.choice(names))
                        else:
                            a.revoke_agent(rng.choice([x for x in names if x != "demo-agent"]))
            except (BadgeError, OSError):
                pass  # the daemon died under us

        t = threading.Thread(target=churn, args=(d.admin, stop))
        t.start()
        time.sleep(rng.uniform(0.3, 1.5))
        d.stop(signal.SIGKILL)
        stop.set()
        t.join(timeout=30)
    d = start_daemon(fresh_state)
    try:
        check_restart_invariants(fresh_state, {"labels": token_labels(fresh_state), "kids": {}})
        with WorkloadClient(d.workload) as w:
            w.fetch_token(audience="demo")
    finally:
        assert d.stop() == 0


def test_recover_with_a_production_config(state_with_two_agents: Path) -> None:
    """``badged recover --config`` on the same state, described by a config file as in
    production (module_env carries SOFTHSM2_CONF): reports, then quarantines."""
    state = state_with_two_agents
    hsm = state / "private" / "softhsm"
    from badged.softhsm import find_module

    config = state.parent / "badged.toml"
    config.write_text(f"""[daemon]
state_dir = "{state}"
workload_socket = "{state}/run/agent.sock"
admin_socket = "{state}/run/admin.sock"
trust_domain = "example.org"
policy_file = "{state}/policy.toml"

[keystore]
backend = "pkcs11"
uri = "pkcs11:token=badged-dev?pin-source=file:{hsm}/user.pin"
module_path = "{find_module()}"

[keystore.module_env]
SOFTHSM2_CONF = "{hsm}/softhsm2.conf"

[audit]
dir = "{state}/audit"
""")
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["PYTHONPATH"] = _pythonpath()

    def recover(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(badged_cmd("recover", "--config", str(config), *args),
                              capture_output=True, text=True, env=env, timeout=60)

    ok = recover()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "nothing to do" in ok.stdout
    (state / "private" / "agents.json").unlink()
    refused = recover()
    assert refused.returncode == 1 and refused.stdout.count("unregistered") == 6
    q = recover("--quarantine")
    assert q.returncode == 0, q.stdout + q.stderr
    assert q.stdout.count("quarantined: badged/agent/") == 6
    assert agent_keys(token_labels(state)) == []
