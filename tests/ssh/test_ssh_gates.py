"""Step-up grants, approvals and rate budgets on kind ``ssh`` (issue 19).

The demo agent's own bundle allows SSHSIG in namespaces git and file only.
Two more bundles are added to the dev policy, bound to nobody: a release
namespace that needs a step-up grant and an operator's approval (who must
see the agent, the executable and the namespace), and a metered one with a
rate budget. Everything is driven with the real ``ssh-keygen -Y sign``.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from badgeclient import AdminClient
from badgeclient.client import ApprovalInfo
from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon, badgectl_cmd
from tests.ssh.conftest import audit_records, run

BUNDLES = """
[bundle.ssh-release]
kinds = ["ssh"]
ssh_namespaces = ["release"]
approval = true

[bundle.ssh-metered]
kinds = ["ssh"]
ssh_namespaces = ["metered"]
rate = "2/1m"
"""


@pytest.fixture(scope="module")
def gated(sshd_daemon: RunningDaemon) -> Iterator[tuple[RunningDaemon, Path]]:
    path = sshd_daemon.state / "policy.toml"
    original = path.read_text()
    # Top-level tables must precede [[agent]]: insert the bundles first.
    path.write_text(BUNDLES + original)
    with AdminClient(sshd_daemon.admin) as a:
        assert a.reload_policy() == (True, "")
    work = short_tmpdir("bsg")
    out = run(sshd_daemon, "ssh-add", "-L")
    assert out.returncode == 0, out.stderr
    (work / "key.pub").write_bytes(out.stdout)
    (work / "msg").write_bytes(b"v2.0.0\n")
    try:
        yield sshd_daemon, work
    finally:
        path.write_text(original)
        with AdminClient(sshd_daemon.admin) as a:
            assert a.reload_policy() == (True, "")
        shutil.rmtree(work, ignore_errors=True)


def _sign(d: RunningDaemon, work: Path, namespace: str) -> subprocess.CompletedProcess[bytes]:
    (work / "msg.sig").unlink(missing_ok=True)
    return run(d, "ssh-keygen", "-Y", "sign", "-n", namespace, "-f", "key.pub", "msg", cwd=work)


def _pending(a: AdminClient) -> ApprovalInfo:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        items = [x for x in a.list_approvals() if x.state == "pending"]
        if items:
            return items[0]
        time.sleep(0.05)
    raise AssertionError("no pending approval appeared")


def test_release_namespace_needs_step_up_and_approval_showing_namespace(
        gated: tuple[RunningDaemon, Path]) -> None:
    d, work = gated
    refused = _sign(d, work, "release")  # no step-up: no bundle allows the namespace
    assert refused.returncode != 0 and not (work / "msg.sig").exists()
    with AdminClient(d.admin) as a:
        grant = a.grant_bundle("demo-agent", "ssh-release", duration_seconds=600,
                               reason="release v2")
        try:
            result: dict[str, subprocess.CompletedProcess[bytes]] = {}
            t = threading.Thread(target=lambda: result.update(r=_sign(d, work, "release")))
            t.start()
            item = _pending(a)
            time.sleep(0.2)
            assert t.is_alive() and not result, "the signature must wait for the decision"
            # What the operator decides on: agent, executable, namespace.
            assert (item.agent, item.kind, item.bundle) == ("demo-agent", "ssh", "ssh-release")
            assert item.exe == shutil.which("ssh-keygen") or item.exe.endswith("/ssh-keygen")
            assert item.detail == "ssh sshsig namespace=release"
            cli = subprocess.run(badgectl_cmd("approvals"), env=d.env(), capture_output=True,
                                 text=True, timeout=30, check=False)
            assert cli.returncode == 0, cli.stderr
            assert "signs: ssh sshsig namespace=release" in cli.stdout  # the operator's view
            a.decide_approval(item.id, approve=True)
            t.join(30)
            assert result["r"].returncode == 0, result["r"].stderr
            assert (work / "msg.sig").exists()
        finally:
            a.revoke_grant(grant.id)
    signed = [r for r in audit_records(d) if r.get("event") == "ssh.signed"][-1]
    assert signed["bundle"] == "ssh-release" and signed["approval"] == item.id
    assert signed["ssh"]["namespace"] == "release"  # type: ignore[index]
    after = _sign(d, work, "release")  # the grant is revoked: refused again
    assert after.returncode != 0


def test_rate_budget_applies_to_ssh_signatures(gated: tuple[RunningDaemon, Path]) -> None:
    d, work = gated
    with AdminClient(d.admin) as a:
        grant = a.grant_bundle("demo-agent", "ssh-metered", duration_seconds=600, reason="ci")
        try:
            assert _sign(d, work, "metered").returncode == 0
            assert _sign(d, work, "metered").returncode == 0
            third = _sign(d, work, "metered")
            assert third.returncode != 0 and not (work / "msg.sig").exists()
        finally:
            a.revoke_grant(grant.id)
    denied = [r for r in audit_records(d) if r.get("event") == "ssh.denied"][-1]
    assert "rate" in str(denied.get("reason")), denied
    assert denied["request"]["ssh"]["namespace"] == "metered"  # type: ignore[index]
