"""Issue 13's attacks on attestation and policy, performed for real.

A real ``badged dev`` daemon (SoftHSM, real sockets); the attackers are real
processes, as ``nobody`` where the threat is another local user: pinned and
impostor copies of the system Python, ``unshare -Urm`` namespaces, real
cgroup v2 directories handed to ``nobody`` the way systemd delegates
``user@UID.service``. Every test fails if the attack yields a credential,
and each has a control showing the same setup *does* issue to the rightful
caller -- so a test that passes is not passing because nothing works.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from badgeclient import (
    AdminClient,
    FailedPreconditionError,
    PermissionDeniedError,
    WorkloadClient,
)
from tests.conftest import ROOT, short_tmpdir
from tests.e2e.conftest import RunningDaemon, start_daemon

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

NOBODY = 65534
HUMAN = 12345  # a uid with no agent rule: a person
SYSTEM_PY = Path("/usr/bin/python3.11")
CLIENT = Path(__file__).with_name("attack_client.py")
AGENTS = ("pinned-sha", "ns-agent", "ns-agent-any", "deploy-bot", "rehash", "root-gated",
          "nobody-agent", "signer")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs attackers as nobody: needs root")


def _site_packages() -> str:
    import grpc

    return str(Path(grpc.__file__).parent.parent)


@pytest.fixture(scope="module")
def bins() -> Iterator[dict[str, Path]]:
    """Copies of the system Python that differ by appended bytes (so by sha256),
    in a directory every user can read: pinned ones and impostors."""
    if not SYSTEM_PY.exists():
        pytest.skip(f"{SYSTEM_PY} not installed (the attackers run a copy of it)")
    base = short_tmpdir("bat")
    os.chmod(base, 0o755)
    out: dict[str, Path] = {}
    for name in ("pinned", "impostor", "ns-pinned", "ns-pinned2", "evil", "rehash"):
        path = base / name
        shutil.copy(SYSTEM_PY, path)
        with open(path, "ab") as fh:
            fh.write(b"\0" + name.encode())
        os.chmod(path, 0o755)
        out[name] = path
    yield out
    shutil.rmtree(base, ignore_errors=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ad(softhsm_available: None, bins: dict[str, Path]) -> Iterator[RunningDaemon]:
    base = short_tmpdir("baa")
    os.chmod(base, 0o755)
    d = start_daemon(base / "s", "--approval-timeout", "20")
    with AdminClient(d.admin) as a:
        for name in AGENTS:
            a.create_agent(name)
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def _reload(d: RunningDaemon, text: str) -> None:
    (d.state / "policy.toml").write_text(text)
    with AdminClient(d.admin) as a:
        ok, error = a.reload_policy()
    assert ok, error


def _env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'clients'}:{_site_packages()}"}


def _client(d: RunningDaemon, exe: Path | str, action: str, *args: str,
            uid: int | None = None) -> dict[str, object]:
    """Run attack_client.py under ``exe`` (optionally as ``uid`` from the start)."""
    cmd = [str(exe), str(CLIENT), str(d.workload), action, *args]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60,
                         user=uid, group=uid, extra_groups=[] if uid is not None else None)
    assert run.stdout.strip(), f"client printed nothing: {run.stderr[-2000:]}"
    result: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def _denied(result: dict[str, object]) -> bool:
    return result.get("ok") is False and result.get("status") == "PERMISSION_DENIED"


# -- 1. connect, fork, exec the pinned binary, let the child talk ---------------------------

HELPER = r"""
import array, os, socket, sys, time
path, chan_fd, exe = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(path)
conn.recv(1, socket.MSG_PEEK)  # the daemon's SETTINGS: accepted, snapshot taken
child = os.fork()
if child == 0:  # the child holds the connection and will do the talking
    chan = socket.socket(fileno=chan_fd)
    chan.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           array.array("i", [conn.fileno()]))])
    os._exit(0)
os.waitpid(child, 0)
if exe:  # the connector becomes the pinned binary
    os.execv(exe, [exe, "-c", "import time; time.sleep(120)"])
time.sleep(120)
"""


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Bridge:
    """Speak gRPC over a received connection fd through a local listener."""

    def __init__(self, upstream: socket.socket) -> None:
        self.dir = short_tmpdir("bab")
        self.path = self.dir / "b.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.upstream = upstream
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        threading.Thread(target=_pump, args=(conn, self.upstream), daemon=True).start()
        _pump(self.upstream, conn)

    def close(self) -> None:
        self.listener.close()
        self.upstream.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _connect_fork_exec(d: RunningDaemon, interpreter: Path,
                       exec_into: Path | None) -> tuple[subprocess.Popen[bytes], _Bridge]:
    ours, theirs = socket.socketpair()
    helper = subprocess.Popen(
        [str(interpreter), "-c", HELPER, str(d.workload), str(theirs.fileno()),
         str(exec_into or "")], pass_fds=[theirs.fileno()], env=_env(),
        user=NOBODY, group=NOBODY, extra_groups=[])
    theirs.close()
    fds = array.array("i")
    _, ancdata, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
    fds.frombytes(ancdata[0][2][: fds.itemsize])
    ours.close()
    if exec_into is not None:
        for _ in range(200):
            if os.path.realpath(f"/proc/{helper.pid}/exe") == str(exec_into):
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the connector never exec'd")
    return helper, _Bridge(socket.socket(fileno=fds[0]))


def _policy_pinned(bins: dict[str, Path]) -> str:
    return f"""
[bundle.demo]
audiences = ["demo"]
scopes = ["read"]
kinds = ["token", "sign"]

[[agent]]
name = "pinned-sha"
selectors = ["unix:uid:{NOBODY}", "unix:sha256:{_sha(bins['pinned'])}"]
bundles = ["demo"]
"""


@needs_root
def test_connect_fork_exec_gets_no_token(ad: RunningDaemon, bins: dict[str, Path]) -> None:
    _reload(ad, _policy_pinned(bins))
    # Control: the pinned binary itself connected; its child talks; issued.
    helper, bridge = _connect_fork_exec(ad, bins["pinned"], None)
    try:
        with WorkloadClient(bridge.path) as c:
            assert c.fetch_token(audience="demo", agent="pinned-sha").agent == "pinned-sha"
    finally:
        helper.kill()
        helper.wait()
        bridge.close()
    # Attack: an impostor connects, forks, and execs the pinned binary; the
    # connector pid now runs exactly what the rule pins.
    helper, bridge = _connect_fork_exec(ad, bins["impostor"], bins["pinned"])
    try:
        with WorkloadClient(bridge.path) as c:
            with pytest.raises(PermissionDeniedError) as info:
                c.fetch_token(audience="demo", agent="pinned-sha")
            assert "executable changed since connect" in str(info.value)
            with pytest.raises(PermissionDeniedError):  # and the connection stays burnt
                c.sign(b"x", agent="pinned-sha")
    finally:
        helper.kill()
        helper.wait()
        bridge.close()
    from badged.audit import tail

    assert any(r.get("event") == "request.refused"
               and "executable changed since connect" in str(r.get("reason"))
               for r in tail(ad.state / "audit", 50))


# -- 2. same-size rewrite in place, mtime restored ---------------------------------------


def test_same_size_rewrite_with_restored_mtime_is_rehashed(ad: RunningDaemon,
                                                           bins: dict[str, Path]) -> None:
    exe = bins["rehash"]
    _reload(ad, f"""
[bundle.demo]
audiences = ["demo"]

[[agent]]
name = "rehash"
selectors = ["unix:uid:{os.getuid()}", "unix:sha256:{_sha(exe)}"]
bundles = ["demo"]
""")
    assert _client(ad, exe, "token", "--agent", "rehash") == {"ok": True, "agent": "rehash"}
    before = os.stat(exe)
    with open(exe, "r+b") as fh:  # same inode, same size: flip the last (appended) byte
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    os.utime(exe, ns=(before.st_atime_ns, before.st_mtime_ns))  # `touch -d` the old mtime
    after = os.stat(exe)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)
    assert _denied(_client(ad, exe, "token", "--agent", "rehash"))


# -- 3. bind mount over the pinned path in an unprivileged user+mount namespace ----------


def _userns_or_skip() -> None:
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, text=True,
                           user=NOBODY, group=NOBODY, extra_groups=[])
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces unavailable here: {probe.stderr.strip()}")


@needs_root
def test_bind_mount_in_user_namespace_gets_no_unix_path(ad: RunningDaemon,
                                                        bins: dict[str, Path]) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) not installed")
    _userns_or_skip()
    pinned, pinned2, evil = bins["ns-pinned"], bins["ns-pinned2"], bins["evil"]
    _reload(ad, f"""
[bundle.demo]
audiences = ["demo"]

[[agent]]
name = "ns-agent"
selectors = ["unix:uid:{NOBODY}", "unix:path:{pinned}"]
bundles = ["demo"]

[[agent]]
name = "ns-agent-any"
selectors = ["unix:uid:{NOBODY}", "unix:path:{pinned2}"]
bundles = ["demo"]
other_mount_ns = true
""")
    ok = {"ok": True, "agent": "ns-agent"}
    # Control: nobody running the pinned path in the daemon's namespace.
    assert _client(ad, pinned, "token", "--agent", "ns-agent", uid=NOBODY) == ok

    def in_namespace(target: Path, agent: str, bind: Path | None) -> dict[str, object]:
        mount = f'mount --bind "{bind}" "{target}" && ' if bind else ""
        return _ns_client(ad, f'{mount}exec "{target}" "$@"', agent)

    # Attack: the impostor bind-mounted over the pinned path, exec'd by that path.
    assert _denied(in_namespace(pinned, "ns-agent", evil))
    # Another mount namespace without the opt-in: no unix:path even for the real file.
    assert _denied(in_namespace(pinned, "ns-agent", None))
    # With other_mount_ns = true the real file matches from another namespace...
    assert in_namespace(pinned2, "ns-agent-any", None) == {"ok": True, "agent": "ns-agent-any"}
    # ...and the bind mount still does not: the daemon finds another file there.
    assert _denied(in_namespace(pinned2, "ns-agent-any", evil))


def _ns_client(d: RunningDaemon, script: str, agent: str) -> dict[str, object]:
    cmd = ["unshare", "-Urm", "sh", "-c", script, "sh", str(CLIENT), str(d.workload), "token",
           "--agent", agent]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60,
                         user=NOBODY, group=NOBODY, extra_groups=[])
    assert run.stdout.strip(), f"client printed nothing: {run.stderr[-2000:]}"
    result: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


# -- 4. a delegated cgroup subtree named like the pinned unit ---------------------------


@pytest.fixture
def cgroup_base() -> Iterator[Path]:
    from badged.attest.process import cgroup2_mount

    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    base = mount / f"badged-attack-{secrets.token_hex(3)}.slice"
    try:
        base.mkdir()
    except OSError as exc:
        pytest.skip(f"cgroup v2 at {mount} is not writable here: {exc}")
    yield base
    for _ in range(50):  # leaf first; the processes in them have exited
        dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        try:
            for p in [*dirs, base]:
                p.rmdir()
            return
        except OSError:
            time.sleep(0.1)


@needs_root
def test_delegated_cgroup_named_like_the_unit_gets_no_unit_selector(
        ad: RunningDaemon, cgroup_base: Path) -> None:
    _reload(ad, f"""
[bundle.demo]
audiences = ["demo"]

[[agent]]
name = "deploy-bot"
selectors = ["unix:uid:{NOBODY}", "systemd:unit:deploy-bot.service"]
bundles = ["demo"]
""")
    py = sys.executable
    # Control: root (systemd's part) put the process in a root-owned unit cgroup.
    real = cgroup_base / "deploy-bot.service"
    real.mkdir()
    ok = _client(ad, py, "token", "--agent", "deploy-bot", "--uid", str(NOBODY),
                 "--cgroup-before", str(real))
    assert ok == {"ok": True, "agent": "deploy-bot"}
    # Attack: a user@UID.service subtree delegated to nobody (directory and
    # its control files chowned, as systemd does); nobody names its own
    # child cgroup deploy-bot.service and moves itself in.
    user = cgroup_base / f"user@{NOBODY}.service"
    user.mkdir()
    for p in (user, user / "cgroup.procs", user / "cgroup.subtree_control",
              user / "cgroup.threads"):
        os.chown(p, NOBODY, NOBODY)
    forged = user / "app.slice" / "deploy-bot.service"
    # nobody creates app.slice/deploy-bot.service itself: prove the user can.
    who = _client(ad, py, "whoami", "--uid", str(NOBODY), "--cgroup-before", str(user),
                  "--cgroup-after", str(forged))
    assert who["ok"] and forged.is_dir() and os.stat(forged).st_uid == NOBODY
    selectors = who["selectors"]
    assert isinstance(selectors, list)
    assert f"unix:cgroup:/{forged.relative_to(cgroup_base.parent)}" in selectors
    assert not any(s.startswith("systemd:unit:") for s in selectors), selectors
    attack = _client(ad, py, "token", "--agent", "deploy-bot", "--uid", str(NOBODY),
                     "--cgroup-before", str(user), "--cgroup-after", str(forged))
    assert _denied(attack), attack


# -- 5. the loader refuses a binding anyone could satisfy ---------------------------------


def test_loader_refuses_exe_binding_without_a_user(ad: RunningDaemon,
                                                   bins: dict[str, Path]) -> None:
    good = _policy_pinned(bins)
    _reload(ad, good)
    bad = good + f'\n[[agent]]\nname = "rehash"\nselectors = ["unix:sha256:{"a" * 64}"]\n' \
                 'bundles = ["demo"]\n'
    (ad.state / "policy.toml").write_text(bad)
    with AdminClient(ad.admin) as a:
        ok, error = a.reload_policy()
    line = len(good.splitlines()) + 4  # a blank line, [[agent]], name, selectors
    assert not ok and f"policy.toml:{line}:" in error and "without a unix:uid" in error
    opted = bad + "allow_any_user = true\n"
    (ad.state / "policy.toml").write_text(opted)
    with AdminClient(ad.admin) as a:
        assert a.reload_policy() == (True, "")
    assert "allow_any_user" in ad.log_text()


# -- 6. approvals: not by the requester, not after the grant is gone ---------------------

APPROVAL_POLICY = f"""
[bundle.demo]
audiences = ["demo"]
scopes = ["read"]

[bundle.prod]
audiences = ["https://prod.example"]
approval = true

[[agent]]
name = "root-gated"
selectors = ["unix:uid:0"]
bundles = ["demo", "prod"]

[[agent]]
name = "nobody-agent"
selectors = ["unix:uid:{NOBODY}"]
bundles = ["demo"]

[delegation]
allow = ["unix:uid:{NOBODY}", "unix:uid:{HUMAN}"]
"""


def _pending(a: AdminClient, agent: str) -> str:
    for _ in range(200):
        ids = [x.id for x in a.list_approvals() if x.state == "pending" and x.agent == agent]
        if ids:
            return ids[0]
        time.sleep(0.05)
    raise AssertionError("no pending approval appeared")


def _nobody_prod_request(d: RunningDaemon) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CLIENT), str(d.workload), "token", "--agent", "nobody-agent",
         "--audience", "https://prod.example", "--uid", str(NOBODY)],
        env={**os.environ, **_env()}, stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = proc.communicate(timeout=60)
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


@needs_root
def test_requester_cannot_approve_its_own_request(ad: RunningDaemon) -> None:
    _reload(ad, APPROVAL_POLICY)
    out: dict[str, object] = {}

    def request() -> None:
        try:
            with WorkloadClient(ad.workload) as w:
                out["token"] = w.fetch_token(audience="https://prod.example", agent="root-gated")
        except Exception as exc:
            out["error"] = exc

    t = threading.Thread(target=request)
    t.start()
    with AdminClient(ad.admin) as a:
        aid = _pending(a, "root-gated")
        with pytest.raises(PermissionDeniedError) as info:  # root asked, root may not approve
            a.decide_approval(aid, approve=True)
        assert "may not approve its own request" in str(info.value)
        assert next(x.state for x in a.list_approvals() if x.id == aid) == "pending"
        a.decide_approval(aid, approve=False)  # denying one's own request is fine
    t.join(30)
    assert "token" not in out and isinstance(out.get("error"), PermissionDeniedError)
    # Control: a request by another uid (nobody) is approved by root and issued.
    with AdminClient(ad.admin) as a:
        g = a.grant_bundle("nobody-agent", "prod", duration_seconds=600, reason="control")
        proc = _nobody_prod_request(ad)
        a.decide_approval(_pending(a, "nobody-agent"), approve=True)
        assert _result(proc) == {"ok": True, "agent": "nobody-agent"}
        a.revoke_grant(g.id)


@needs_root
def test_approval_after_the_grant_is_revoked_or_expired_does_not_issue(
        ad: RunningDaemon) -> None:
    _reload(ad, APPROVAL_POLICY)
    with AdminClient(ad.admin) as a:
        g = a.grant_bundle("nobody-agent", "prod", duration_seconds=600, reason="incident")
        proc = _nobody_prod_request(ad)
        aid = _pending(a, "nobody-agent")
        a.revoke_grant(g.id)  # cancels what the grant opened
        assert next(x.state for x in a.list_approvals() if x.id == aid) == "cancelled"
        with pytest.raises(FailedPreconditionError):
            a.decide_approval(aid, approve=True)
        result = _result(proc)
        assert _denied(result) and "cancelled" in str(result["message"]), result

        # A grant that expires while the request waits: approving re-evaluates.
        g = a.grant_bundle("nobody-agent", "prod", duration_seconds=2, reason="short")
        proc = _nobody_prod_request(ad)
        aid = _pending(a, "nobody-agent")
        time.sleep(2.5)
        with pytest.raises(FailedPreconditionError) as info:
            a.decide_approval(aid, approve=True)
        assert "no longer allows" in str(info.value)
        result = _result(proc)
        assert _denied(result), result
        assert next(x.state for x in a.list_approvals() if x.id == aid) == "cancelled"


# -- 7. an agent cannot create a delegation for its own user -----------------------------


@needs_root
def test_agent_cannot_create_a_delegation(ad: RunningDaemon) -> None:
    _reload(ad, APPROVAL_POLICY)
    py = sys.executable
    # nobody is in [delegation] allow, but it is also the agent nobody-agent.
    attack = _client(ad, py, "delegate", "--agent", "nobody-agent", "--uid", str(NOBODY))
    assert _denied(attack), attack
    from badged.audit import tail

    assert any(r.get("event") == "delegation.denied"
               and "agents may not delegate" in str(r.get("reason"))
               for r in tail(ad.state / "audit", 20))
    # Control: a person (a uid no agent rule matches) delegates to the agent.
    human = _client(ad, py, "delegate", "--agent", "nobody-agent", "--uid", str(HUMAN))
    assert human["ok"] is True, human


# -- 8. a gated sign bundle cannot be bypassed through an ungated one --------------------


@needs_root
def test_sign_through_an_ungated_bundle_cannot_bypass_a_gated_one(ad: RunningDaemon) -> None:
    gated = f"""
[bundle.sign-metered]
kinds = ["sign"]
rate = "1/1h"

[bundle.sign-open]
kinds = ["sign"]

[[agent]]
name = "signer"
selectors = ["unix:uid:{NOBODY}"]
bundles = ["sign-metered"]
"""
    # The ambiguous policy (the baseline also signs, ungated) is refused.
    (ad.state / "policy.toml").write_text(
        '[baseline]\naudiences = ["demo"]\nkinds = ["token", "sign"]\n' + gated)
    with AdminClient(ad.admin) as a:
        ok, error = a.reload_policy()
    assert not ok and "kind 'sign'" in error and "sign-metered" in error
    _reload(ad, gated)
    py = sys.executable
    with AdminClient(ad.admin) as a:
        g = a.grant_bundle("signer", "sign-open", duration_seconds=600, reason="bypass?")
        try:
            first = _client(ad, py, "sign", "--agent", "signer", "--uid", str(NOBODY))
            assert first == {"ok": True, "agent": "signer"}
            second = _client(ad, py, "sign", "--agent", "signer", "--uid", str(NOBODY))
            assert second.get("status") == "RESOURCE_EXHAUSTED", second
        finally:
            a.revoke_grant(g.id)
