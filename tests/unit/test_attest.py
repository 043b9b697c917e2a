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
from badged.listener.peers import PeerCredentials, PeerRegistry, proc_start_time, read_peer


def _pidfd(pid: int) -> int:
    return os.pidfd_open(pid)


def test_attests_live_process_from_the_kernel() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        peer = PeerCredentials(pid=child.pid, uid=os.getuid(), gid=os.getgid(),
                               pidfd=_pidfd(child.pid), start_time=proc_start_time(child.pid),
                               channel="workload")
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
                           start_time=proc_start_time(os.getpid()), channel="workload")
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
                               proc_start_time(child.pid), "workload")
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
        reg = PeerRegistry()
        reg.register("badged-x", peer)
        assert reg.lookup("badged-x") is peer
        assert reg.lookup("unix:") is None and reg.lookup("unix-abstract:other") is None
        assert reg.connections_of(os.getuid()) == 1
        reg.release("badged-x")
        assert reg.connections_of(os.getuid()) == 0 and len(reg) == 0


def test_exec_is_noticed_on_the_next_request() -> None:
    """Caching must not hide an exec: same pid (same pidfd), new executable."""
    r, w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys; os.read(int(sys.argv[1]), 1); os.execv('/bin/sleep', ['sleep', '30'])",
         str(r)], pass_fds=[r])
    try:
        peer = PeerCredentials(child.pid, os.getuid(), os.getgid(), _pidfd(child.pid),
                               proc_start_time(child.pid), "workload")
        attestor = ProcessAttestor()
        before = attestor.attest(peer)
        assert before.exe == os.path.realpath(sys.executable)
        os.write(w, b"x")
        for _ in range(100):
            after = attestor.attest(peer)
            if after.exe != before.exe:
                break
            time.sleep(0.02)
        assert after.exe == os.path.realpath("/bin/sleep")
        assert after.exe_sha256 != before.exe_sha256
    finally:
        child.kill()
        child.wait()
        os.close(r)
        os.close(w)


def test_selectors_are_remembered_per_attribute_set_not_per_pid() -> None:
    """The selector cache is keyed by every attribute: changing one changes the answer."""
    from badged.attest.process import ProcessAttributes

    base = dict(pid=1, uid=os.getuid(), gid=os.getgid(), groups=(5,), exe="/usr/bin/a",
                exe_sha256="ab" * 32, cgroup="/system.slice/x.service", chain=("/usr/bin/p",))
    one = ProcessAttributes(**base).selectors()  # type: ignore[arg-type]
    assert ProcessAttributes(**{**base, "pid": 2}).selectors() is one  # type: ignore[arg-type]
    for field, value in [("exe", "/usr/bin/b"), ("exe_sha256", "cd" * 32), ("groups", (6,)),
                         ("cgroup", "/system.slice/y.service"), ("chain", ("/usr/bin/q",)),
                         ("uid", os.getuid() + 1)]:
        other = ProcessAttributes(**{**base, field: value}).selectors()  # type: ignore[arg-type]
        assert other != one, field
    assert "systemd:unit:x.service" in one and "unix:parent_path:/usr/bin/p" in one
