"""Two agents, two uids: each caller lists exactly its own agent's key (issue 19).

``demo-agent`` is bound to the test's uid (root); ``other-agent`` is created
by the operator and bound to ``nobody``. ``ssh-add -L`` run by each shows
only its own agent's key, and neither can sign with the other's.
"""

from __future__ import annotations

import base64
import os

import pytest

from badgeclient import AdminClient
from badged.sshagent import wire
from tests.e2e.conftest import RunningDaemon
from tests.ssh.conftest import NOBODY, agent_sock, run
from tests.ssh.test_ssh_agent import RAW_SIGN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs a caller as nobody: needs root")

RULE = """
[[agent]]
name = "other-agent"
selectors = ["unix:uid:65534"]
bundles = ["demo"]
"""


def _keys(d: RunningDaemon, uid: int | None) -> list[str]:
    out = run(d, "ssh-add", "-L", uid=uid)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().strip().splitlines()


def _raw_sign(d: RunningDaemon, line: str, uid: int | None) -> bytes:
    blob = base64.b64decode(line.split(" ")[1])
    data = (b"SSHSIG" + wire.string(b"git") + wire.string(b"") + wire.string(b"sha512")
            + wire.string(bytes(64)))
    request = wire.frame(wire.SSH_AGENTC_SIGN_REQUEST,
                         wire.string(blob) + wire.string(data) + wire.u32(0))
    out = run(d, "/usr/bin/python3", "-c", RAW_SIGN, str(agent_sock(d)), request.hex(), uid=uid)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_each_uid_lists_and_uses_only_its_own_agents_key(sshd_daemon: RunningDaemon) -> None:
    d = sshd_daemon
    with AdminClient(d.admin) as a:
        a.create_agent("other-agent")
        path = d.state / "policy.toml"
        path.write_text(path.read_text() + RULE)
        assert a.reload_policy() == (True, "")
    mine, theirs = _keys(d, None), _keys(d, NOBODY)
    assert len(mine) == 1 and mine[0].endswith("/agent/demo-agent")
    assert len(theirs) == 1 and theirs[0].endswith("/agent/other-agent")
    assert mine[0].split()[1] != theirs[0].split()[1]
    assert _raw_sign(d, theirs[0], NOBODY) == b"0e"  # SIGN_RESPONSE with its own key
    assert _raw_sign(d, mine[0], NOBODY) == b"05"  # FAILURE: demo-agent's key
    assert _raw_sign(d, theirs[0], None) == b"05"  # and the other way round
