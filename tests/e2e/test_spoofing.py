"""Identity spoofing against a real daemon: a connection whose process exited.

A child connects to the workload socket, hands the connected fd to us
(SCM_RIGHTS) and exits. We then speak gRPC over that fd through a small local
bridge. The daemon must see the *child* (frozen at connect()) and, since it
is gone, refuse -- it must never attest whatever process now has that pid.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from badgeclient import InvalidRequestError, PermissionDeniedError, WorkloadClient
from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

CHILD = """
import array, socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(sys.argv[1])
chan = socket.socket(fileno=int(sys.argv[2]))
chan.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))])
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


def _fd_from_exited_child(workload: Path) -> socket.socket:
    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(workload), str(theirs.fileno())],
                             pass_fds=[theirs.fileno()])
    theirs.close()
    fds = array.array("i")
    _, ancdata, _, _ = ours.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
    fds.frombytes(ancdata[0][2][: fds.itemsize])
    assert child.wait(timeout=30) == 0
    ours.close()
    return socket.socket(fileno=fds[0])


def test_connection_of_exited_process_is_refused(daemon: RunningDaemon) -> None:
    upstream = _fd_from_exited_child(daemon.workload)
    bridge_dir = short_tmpdir("bbr")
    bridge_path = bridge_dir / "b.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(bridge_path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        threading.Thread(target=_pump, args=(conn, upstream), daemon=True).start()
        _pump(upstream, conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        with WorkloadClient(bridge_path) as c, pytest.raises(PermissionDeniedError) as info:
            c.fetch_token(audience="demo")
        assert info.value.code == "attestation_failed"
    finally:
        listener.close()
        upstream.close()
    assert "exited" in daemon.log_text()
    # The live process itself is still served.
    with WorkloadClient(daemon.workload) as c:
        assert c.fetch_token(audience="demo").agent == "demo-agent"
    os.unlink(bridge_path)


def test_refusals_before_policy_are_audited(daemon: RunningDaemon) -> None:
    """A request refused before the policy gate (malformed) still leaves a record."""
    from badged.audit import tail

    with WorkloadClient(daemon.workload) as c, pytest.raises(InvalidRequestError):
        c.sign(b"x" * (64 * 1024 + 1))
    records = tail(daemon.state / "audit", 50)
    assert any(r.get("event") == "request.refused" and r.get("code") == "invalid_request"
               and "pid=" in str(r.get("peer")) for r in records), records[-3:]
