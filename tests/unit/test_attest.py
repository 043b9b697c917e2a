"""Workload attestation against real processes: pidfd liveness, pid reuse,
exe hashing of the mapped binary (not a path the caller names)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from badged.attest.process import ProcessAttestor
from badged.errors import AttestationError
from badged.listener.peers import (
    PeerCredentials,
    PeerRegistry,
    exe_identity,
    proc_start_time,
    read_peer,
)


def _pidfd(pid: int) -> int:
    return os.pidfd_open(pid)


def test_attests_live_process_from_the_kernel() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        peer = PeerCredentials(pid=child.pid, uid=os.getuid(), gid=os.getgid(),
                               pidfd=_pidfd(child.pid), start_time=proc_start_time(child.pid),
                               channel="workload", exe=exe_identity(child.pid))
        attrs = ProcessAttestor().attest(peer)
        assert attrs.exe == os.path.realpath(sys.executable)
        with open(os.path.realpath(sys.executable), "rb") as fh:
            assert attrs.exe_sha256 == hashlib.sha256(fh.read()).hexdigest()
        sels = attrs.selectors()
        assert f"unix:uid:{os.getuid()}" in sels and f"unix:sha256:{attrs.exe_sha256}" in sels
    finally:
        child.kill()
        child.wait()


def test_exited_caller_is_refused() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    fd = _pidfd(child.pid)
    child.wait()
    peer = PeerCredentials(pid=child.pid, uid=os.getuid(), gid=os.getgid(), pidfd=fd,
                           start_time=0, channel="workload")
    with pytest.raises(AttestationError):
        ProcessAttestor().attest(peer)
    os.close(fd)


def test_recycled_pid_is_refused() -> None:
    """The pid now names a *live* process (us), but the pidfd is of the dead caller.

    Reading /proc/<pid> alone would attest the wrong process; the pidfd check
    after reading refuses it.
    """
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    fd = _pidfd(child.pid)
    child.wait()
    peer = PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), pidfd=fd,
                           start_time=proc_start_time(os.getpid()), channel="workload",
                           exe=exe_identity(os.getpid()))
    with pytest.raises(AttestationError):
        ProcessAttestor().attest(peer)
    os.close(fd)


def test_start_time_fallback_detects_reuse_without_pidfd() -> None:
    me = os.getpid()
    assert PeerCredentials(me, 0, 0, -1, proc_start_time(me), "workload").is_alive()
    assert not PeerCredentials(me, 0, 0, -1, proc_start_time(me) - 1, "workload").is_alive()


def test_impostor_binary_at_same_path_gets_other_hash(tmp_path: Path) -> None:
    """Replacing the file after exec does not change what the daemon hashes."""
    exe = tmp_path / "agent-bin"
    shutil.copy("/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "30"])
    try:
        time.sleep(0.1)
        peer = PeerCredentials(child.pid, os.getuid(), os.getgid(), _pidfd(child.pid),
                               proc_start_time(child.pid), "workload", exe_identity(child.pid))
        first = ProcessAttestor().attest(peer)
        exe.unlink()
        exe.write_bytes(b"#!/bin/sh\necho impostor\n")
        second = ProcessAttestor().attest(peer)
        assert first.exe_sha256 == second.exe_sha256
        with open("/bin/sleep", "rb") as fh:
            assert second.exe_sha256 == hashlib.sha256(fh.read()).hexdigest()
    finally:
        child.kill()
        child.wait()


def test_read_peer_on_real_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = read_peer(a, "workload")
        assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert peer.pidfd >= 0, "kernel should support SO_PEERPIDFD (Linux >= 6.5)"
        assert peer.is_alive()
        # The executable is fixed at accept, with the mount namespace.
        st = os.stat("/proc/self/exe")
        assert peer.exe is not None and peer.exe.same_file(st.st_dev, st.st_ino)
        assert peer.exe.ctime_ns == st.st_ctime_ns and peer.exe.mnt_ns > 0
        assert peer.lost.reason is None
        reg = PeerRegistry()
        reg.register("badged-x", peer)
        assert reg.lookup("badged-x") is peer
        assert reg.lookup("unix:") is None and reg.lookup("unix-abstract:other") is None
        assert reg.connections_of(os.getuid()) == 1
        reg.release("badged-x")
        assert reg.connections_of(os.getuid()) == 0 and len(reg) == 0


def test_exec_after_connect_loses_the_identity_for_good() -> None:
    """Same pid (same pidfd), new executable: refused, and refused again after."""
    r, w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys; os.read(int(sys.argv[1]), 1); os.execv('/bin/sleep', ['sleep', '30'])",
         str(r)], pass_fds=[r])
    try:
        peer = PeerCredentials(child.pid, os.getuid(), os.getgid(), _pidfd(child.pid),
                               proc_start_time(child.pid), "workload", exe_identity(child.pid))
        attestor = ProcessAttestor()
        before = attestor.attest(peer)
        assert before.exe == os.path.realpath(sys.executable)
        os.write(w, b"x")
        for _ in range(200):
            if os.path.realpath(f"/proc/{child.pid}/exe") != before.exe:
                break
            time.sleep(0.02)
        with pytest.raises(AttestationError) as info:
            attestor.attest(peer)
        assert "executable changed since connect" in str(info.value)
        assert "executable changed since connect" in info.value.caller_message
        assert peer.lost.reason == "executable changed since connect"
        with pytest.raises(AttestationError):  # for good, with a fresh attestor too
            ProcessAttestor().attest(peer)
    finally:
        child.kill()
        child.wait()
        os.close(r)
        os.close(w)


def test_credentials_without_a_snapshot_fail_closed() -> None:
    """A front that forgot the accept-time snapshot must not get exe selectors."""
    me = os.getpid()
    fd = _pidfd(me)
    try:
        peer = PeerCredentials(me, os.getuid(), os.getgid(), fd, proc_start_time(me), "workload")
        with pytest.raises(AttestationError):
            ProcessAttestor().attest(peer)
    finally:
        os.close(fd)


def test_same_size_rewrite_with_restored_mtime_is_rehashed(tmp_path: Path) -> None:
    """(dev, inode, size, mtime) stay equal; ctime does not, so the hash is redone."""
    exe = tmp_path / "agent-bin"
    shutil.copy("/bin/sleep", exe)
    attestor = ProcessAttestor()

    def run_and_hash() -> str | None:
        child = subprocess.Popen([str(exe), "30"])
        try:
            for _ in range(100):
                if os.path.realpath(f"/proc/{child.pid}/exe") == str(exe):
                    break
                time.sleep(0.01)
            peer = PeerCredentials(child.pid, os.getuid(), os.getgid(), _pidfd(child.pid),
                                   proc_start_time(child.pid), "workload",
                                   exe_identity(child.pid))
            return attestor.attest(peer).exe_sha256
        finally:
            child.kill()
            child.wait()

    first = run_and_hash()
    before = os.stat(exe)
    data = bytearray(exe.read_bytes())
    data[-1] ^= 0xFF  # same size, still runs (the last byte is padding)
    with open(exe, "r+b") as fh:  # in place: same inode
        fh.write(data)
    os.utime(exe, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(exe)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)
    second = run_and_hash()
    assert second == hashlib.sha256(bytes(data)).hexdigest() != first


def test_unix_path_needs_the_file_the_daemon_finds_there(tmp_path: Path) -> None:
    """The path selector is emitted only when that path is the executing file."""
    exe = tmp_path / "agent-bin"
    shutil.copy("/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "30"])
    try:
        time.sleep(0.1)
        peer = PeerCredentials(child.pid, os.getuid(), os.getgid(), _pidfd(child.pid),
                               proc_start_time(child.pid), "workload", exe_identity(child.pid))
        attestor = ProcessAttestor(path_ttl=0.0)
        assert f"unix:path:{exe}" in attestor.attest(peer).selectors()
        exe.unlink()  # another file now sits at the pinned path
        shutil.copy("/bin/true", exe)
        attrs = attestor.attest(peer)
        assert not any(s.startswith("unix:path:") for s in attrs.selectors())
        assert attrs.exe_sha256  # the hash of what runs is still known
    finally:
        child.kill()
        child.wait()


def _cgroup_tree(root: Path, rel: str, owner: int = 0) -> Path:
    here = root
    for part in rel.strip("/").split("/"):
        here = here / part
        here.mkdir(mode=0o755, exist_ok=True)
        (here / "cgroup.procs").touch(mode=0o644)
    return here


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_cgroup_names_count_only_in_root_owned_directories(tmp_path: Path) -> None:
    from badged.attest.process import CgroupTrust

    root = tmp_path / "cg"
    root.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    trust = CgroupTrust(root, ttl=0.0)
    cid = "ab" * 32
    _cgroup_tree(root, "/system.slice/deploy-bot.service")
    _cgroup_tree(root, f"/system.slice/docker-{cid}.scope")
    assert trust.names("/system.slice/deploy-bot.service") == ("deploy-bot.service", None)
    assert trust.names(f"/system.slice/docker-{cid}.scope") == (f"docker-{cid}.scope", cid)
    # A user's delegated subtree: any name, owned by the user.
    user = _cgroup_tree(root, "/user.slice/user@65534.service/app.slice/deploy-bot.service")
    for d in (user, user.parent, user.parent.parent):
        os.chown(d, 65534, 65534)
        os.chown(d / "cgroup.procs", 65534, 65534)
    assert trust.names("/user.slice/user@65534.service/app.slice/deploy-bot.service") == (
        None, None)
    # Same shape, but owned by root: still refused for the user@ component.
    _cgroup_tree(root, "/user.slice/user@0.service/deploy-bot.service")
    assert trust.names("/user.slice/user@0.service/deploy-bot.service") == (None, None)
    # A root-owned unit directory whose cgroup.procs was handed to a user.
    leaky = _cgroup_tree(root, "/system.slice/leaky.service")
    os.chown(leaky / "cgroup.procs", 65534, 65534)
    assert trust.names("/system.slice/leaky.service") == (None, None)
    # A group-writable ancestor, a path that does not exist, no mount at all.
    _cgroup_tree(root, "/loose.slice/x.service")
    os.chmod(root / "loose.slice", 0o775)
    assert trust.names("/loose.slice/x.service") == (None, None)
    assert trust.names("/system.slice/ghost.service") == (None, None)
    assert CgroupTrust(None).names("/system.slice/deploy-bot.service") == (None, None)


def test_selectors_are_remembered_per_attribute_set_not_per_pid() -> None:
    """The selector cache is keyed by every attribute: changing one changes the answer."""
    from badged.attest.process import ProcessAttributes

    base = dict(pid=1, uid=os.getuid(), gid=os.getgid(), groups=(5,), exe="/usr/bin/a",
                exe_sha256="ab" * 32, cgroup="/system.slice/x.service", chain=("/usr/bin/p",),
                exe_path_verified=True, unit="x.service", chain_verified=(True,))
    one = ProcessAttributes(**base).selectors()  # type: ignore[arg-type]
    assert ProcessAttributes(**{**base, "pid": 2}).selectors() is one  # type: ignore[arg-type]
    for field, value in [("exe", "/usr/bin/b"), ("exe_sha256", "cd" * 32), ("groups", (6,)),
                         ("cgroup", "/system.slice/y.service"), ("chain", ("/usr/bin/q",)),
                         ("uid", os.getuid() + 1), ("unit", "y.service"),
                         ("exe_path_verified", False), ("other_mount_ns", True),
                         ("chain_verified", (False,))]:
        other = ProcessAttributes(**{**base, field: value}).selectors()  # type: ignore[arg-type]
        assert other != one, field
    assert "systemd:unit:x.service" in one and "unix:parent_path:/usr/bin/p" in one
