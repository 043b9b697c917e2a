"""The attestor's per-connection memo (hot path, docs/performance.md): an unchanged
caller gets the same attributes object back, and nothing it reads is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from badged.attest import process as attest_process
from badged.attest.process import ProcessAttestor
from badged.errors import AttestationError
from badged.listener.peers import PeerCredentials, exe_identity, proc_start_time


def _peer(pid: int) -> PeerCredentials:
    return PeerCredentials(pid, os.getuid(), os.getgid(), os.pidfd_open(pid),
                           proc_start_time(pid), "workload", exe_identity(pid))


def test_unchanged_caller_gets_the_same_attributes_and_selectors_once() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        peer = _peer(child.pid)
        attestor = ProcessAttestor()
        first = attestor.attest(peer)
        sels = first.selectors()
        again = attestor.attest(peer)
        assert again is first and again.selectors() is sels
        # A second connection of the same process has its own memo (and the same answer).
        other = attestor.attest(_peer(child.pid))
        assert other is not first and other == first
    finally:
        child.kill()
        child.wait()


def test_memo_does_not_outlive_the_slow_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups, cgroup and parents are re-read after SLOW_ATTRS_TTL: a new object then,
    so nothing remembered (user and group names included) is older than before."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        peer = _peer(child.pid)
        attestor = ProcessAttestor()
        first = attestor.attest(peer)
        monkeypatch.setattr(attest_process, "SLOW_ATTRS_TTL", 0.0)
        time.sleep(0.01)
        second = attestor.attest(peer)
        assert second is not first and second == first
    finally:
        child.kill()
        child.wait()


def test_memo_never_answers_for_a_caller_that_exited() -> None:
    """The pidfd check runs on every request, before the memo is consulted."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    peer = _peer(child.pid)
    attestor = ProcessAttestor()
    attestor.attest(peer)
    assert child.stdin is not None
    child.stdin.close()
    child.wait()
    with pytest.raises(AttestationError):
        attestor.attest(peer)


def test_memo_never_answers_after_an_exec() -> None:
    """An exec after connect is caught on the request after it, memo or not."""
    r, w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys; os.read(int(sys.argv[1]), 1); os.execv('/bin/sleep', ['sleep', '30'])",
         str(r)], pass_fds=[r])
    try:
        peer = _peer(child.pid)
        attestor = ProcessAttestor()
        before = attestor.attest(peer)
        assert attestor.attest(peer) is before  # memo in use
        os.write(w, b"x")
        for _ in range(200):
            if os.path.realpath(f"/proc/{child.pid}/exe") != before.exe:
                break
            time.sleep(0.02)
        with pytest.raises(AttestationError, match="executable changed since connect"):
            attestor.attest(peer)
    finally:
        child.kill()
        child.wait()
        os.close(r)
        os.close(w)
