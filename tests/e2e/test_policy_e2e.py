"""Least-agency policy end to end: real daemon, real processes that differ in
one attribute, step-ups that expire, approvals that block, delegation, explain,
reload with a broken file, rate budgets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from badgeclient import (
    AdminClient,
    PermissionDeniedError,
    RateLimitedError,
    Token,
    WorkloadClient,
)
from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon, badgectl_cmd, start_daemon

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]
HERE = Path(__file__).parent
UID = os.getuid()
PY_HASH = hashlib.sha256(Path(os.path.realpath(sys.executable)).read_bytes()).hexdigest()

POLICY = f"""
[bundle.demo]
audiences = ["demo"]
scopes = ["read", "write"]
kinds = ["token", "sign"]
max_ttl = "1h"

[bundle.extra]
audiences = ["https://extra.example"]
scopes = ["extra"]
max_ttl = "5m"

[bundle.prod]
audiences = ["https://prod.example"]
scopes = ["prod:write"]
max_ttl = "5m"
approval = true

[bundle.metered]
audiences = ["https://metered.example"]
max_ttl = "5m"
rate = "3/1m"

[[agent]]
name = "demo-agent"
selectors = ["unix:uid:{UID}", "unix:sha256:{PY_HASH}"]
bundles = ["demo", "metered"]

[[agent]]
name = "other-agent"
selectors = ["unix:uid:4242"]
bundles = ["demo"]

# The test runs as one uid, like a single-user dev box (test_attack_attest.py
# covers both switches off).
[delegation]
allow = ["unix:uid:{UID}"]
agents_may_delegate = true

[approval]
requester_may_approve = true
"""


@pytest.fixture(scope="module")
def pd(softhsm_available: None) -> Iterator[RunningDaemon]:
    base = short_tmpdir("bpe")
    os.chmod(base, 0o755)
    d = start_daemon(base / "s", "--approval-timeout", "8")
    (d.state / "policy.toml").write_text(POLICY)
    with AdminClient(d.admin) as a:
        assert a.reload_policy() == (True, "")
        a.create_agent("other-agent")
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def _claims(token: Token, w: WorkloadClient) -> dict[str, object]:
    return dict(jwt.decode(token.token, KeySet.import_key_set(w.jwks()),  # type: ignore[arg-type]
                           algorithms=["ES256"]).claims)


def test_impostor_binary_with_same_uid_is_refused(pd: RunningDaemon, tmp_path: Path) -> None:
    """Same uid, same code, one appended byte: a different sha256, no identity."""
    impostor = tmp_path / "python3.11"
    shutil.copy(os.path.realpath(sys.executable), impostor)
    with open(impostor, "ab") as fh:
        fh.write(b"\0impostor")
    env = {**pd.env(), "PYTHONHOME": sys.base_prefix,
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    script = ("import json,sys; from badgeclient import WorkloadClient, BadgeError\n"
              "c = WorkloadClient(sys.argv[1])\n"
              "try:\n    c.fetch_token(audience='demo'); print('ISSUED')\n"
              "except BadgeError as e: print(e.status)\n")
    real = subprocess.run([sys.executable, "-c", script, str(pd.workload)], env=env,
                          capture_output=True, text=True, timeout=60)
    fake = subprocess.run([str(impostor), "-c", script, str(pd.workload)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert real.stdout.strip() == "ISSUED", real.stderr
    assert fake.stdout.strip() == "PERMISSION_DENIED", fake.stderr


def test_step_up_grant_expires_on_time(pd: RunningDaemon) -> None:
    with WorkloadClient(pd.workload) as w, AdminClient(pd.admin) as a:
        with pytest.raises(PermissionDeniedError):
            w.fetch_token(audience="https://extra.example", scopes=["extra"])
        g = a.grant_bundle("demo-agent", "extra", duration_seconds=3, reason="incident 42")
        assert g.state == "active" and g.expires_at - g.created_at == 3
        tok = w.fetch_token(audience="https://extra.example", scopes=["extra"])
        assert _claims(tok, w)["scope"] == "extra"
        time.sleep(3.5)
        with pytest.raises(PermissionDeniedError):
            w.fetch_token(audience="https://extra.example", scopes=["extra"])
        assert [x.state for x in a.list_grants(include_inactive=True) if x.id == g.id] == ["expired"]


def test_step_up_can_be_revoked_early(pd: RunningDaemon) -> None:
    with WorkloadClient(pd.workload) as w, AdminClient(pd.admin) as a:
        g = a.grant_bundle("demo-agent", "extra", duration_seconds=600, reason="test")
        w.fetch_token(audience="https://extra.example")
        assert a.revoke_grant(g.id).state == "revoked"
        with pytest.raises(PermissionDeniedError):
            w.fetch_token(audience="https://extra.example")


def _fetch_async(pd: RunningDaemon, out: dict[str, object]) -> threading.Thread:
    def run() -> None:
        try:
            with WorkloadClient(pd.workload) as w:
                out["token"] = w.fetch_token(audience="https://prod.example",
                                             scopes=["prod:write"], reason="hotfix #7")
        except Exception as exc:
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t


def _pending(a: AdminClient) -> list[str]:
    for _ in range(100):
        ids = [x.id for x in a.list_approvals() if x.state == "pending"]
        if ids:
            return ids
        time.sleep(0.05)
    raise AssertionError("no pending approval appeared")


def test_approval_blocks_until_approved_and_is_recorded(pd: RunningDaemon) -> None:
    with AdminClient(pd.admin) as a:
        g = a.grant_bundle("demo-agent", "prod", duration_seconds=600, reason="release")
        out: dict[str, object] = {}
        t = _fetch_async(pd, out)
        (aid,) = _pending(a)
        time.sleep(0.3)
        assert t.is_alive() and not out, "request must wait for the decision"
        item = next(x for x in a.list_approvals() if x.id == aid)
        assert item.reason == "hotfix #7" and item.exe and item.pid > 0 and item.exe_sha256
        a.decide_approval(aid, approve=True)
        t.join(30)
        tok = out["token"]
        assert isinstance(tok, Token)
        with WorkloadClient(pd.workload) as w:
            claims = _claims(tok, w)
        assert claims["approval"]["id"] == aid and claims["approval"]["by"]  # type: ignore[index]

        out2: dict[str, object] = {}
        t2 = _fetch_async(pd, out2)
        (aid2,) = _pending(a)
        a.decide_approval(aid2, approve=False, comment="not now")
        t2.join(30)
        assert isinstance(out2.get("error"), PermissionDeniedError)
        assert "denied by an operator" in str(out2["error"])
        a.revoke_grant(g.id)


def test_approval_times_out_and_cancelled_when_caller_exits(pd: RunningDaemon) -> None:
    with AdminClient(pd.admin) as a:
        g = a.grant_bundle("demo-agent", "prod", duration_seconds=600, reason="release")
        script = ("import sys; from badgeclient import WorkloadClient\n"
                  "WorkloadClient(sys.argv[1]).fetch_token(audience='https://prod.example')\n")
        child = subprocess.Popen([sys.executable, "-c", script, str(pd.workload)], env=pd.env(),
                                 stderr=subprocess.DEVNULL)
        (cid,) = _pending(a)
        child.send_signal(signal.SIGKILL)
        child.wait()
        for _ in range(100):
            state = next(x.state for x in a.list_approvals() if x.id == cid)
            if state != "pending":
                break
            time.sleep(0.05)
        assert state == "cancelled"

        out: dict[str, object] = {}
        t = _fetch_async(pd, out)
        t.join(30)  # daemon started with --approval-timeout 8
        assert isinstance(out.get("error"), PermissionDeniedError)
        assert "timed out" in str(out["error"])
        a.revoke_grant(g.id)


def test_delegation_carries_both_identities_within_intersection(pd: RunningDaemon) -> None:
    env = pd.env()
    out = subprocess.run(badgectl_cmd("delegate", "demo-agent", "--scope", "read", "--scope",
                                      "admin", "--audience", "demo", "--for", "1h", "--json"),
                         env=env, capture_output=True, text=True, check=True)
    deleg = json.loads(out.stdout)
    assert deleg["user"] and deleg["uid"] == UID and deleg["agent"] == "demo-agent"
    with WorkloadClient(pd.workload) as w:
        tok = w.fetch_token(audience="demo", scopes=["read"], delegation=deleg["id"])
        claims = _claims(tok, w)
        assert claims["sub"] == f"spiffe://example.org/user/{deleg['user']}"
        assert claims["act"] == {"sub": "spiffe://example.org/agent/demo-agent"}
        # "admin" is in the delegation but not in the agent's bundles: never granted.
        with pytest.raises(PermissionDeniedError):
            w.fetch_token(audience="demo", scopes=["admin"], delegation=deleg["id"])
        # "write" is the agent's, but outside the delegation.
        with pytest.raises(PermissionDeniedError):
            w.fetch_token(audience="demo", scopes=["write"], delegation=deleg["id"])
        with pytest.raises(PermissionDeniedError):
            w.fetch_token(audience="demo", scopes=["read"], delegation="d-doesnotexist")
        other = w.delegate(agent="other-agent", scopes=["read"])
        with pytest.raises(PermissionDeniedError):  # a grant given to another agent
            w.fetch_token(audience="demo", scopes=["read"], delegation=other.id)
    with AdminClient(pd.admin) as a:
        a.revoke_delegation(deleg["id"])
    with WorkloadClient(pd.workload) as w, pytest.raises(PermissionDeniedError):
        w.fetch_token(audience="demo", scopes=["read"], delegation=deleg["id"])


def test_explain_says_which_rule_and_why(pd: RunningDaemon) -> None:
    env = pd.env()
    me = str(os.getpid())
    ok = subprocess.run(badgectl_cmd("policy", "explain", "--pid", me, "--audience", "demo",
                                     "--scope", "read"), env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ALLOW"), ok.stderr
    assert "bundle=demo" in ok.stdout and "policy.toml:" in ok.stdout
    no = subprocess.run(badgectl_cmd("policy", "explain", "--pid", me, "--audience", "nope",
                                     "--json"), env=env, capture_output=True, text=True, check=True)
    doc = json.loads(no.stdout)
    assert doc["allowed"] is False
    assert any("audience 'nope' not in bundle" in line for line in doc["trace"])
    assert "denied" in pd.log_text()


def test_rate_budget_is_resource_exhausted_with_retry_hint(pd: RunningDaemon) -> None:
    with WorkloadClient(pd.workload) as w:
        for _ in range(3):
            w.fetch_token(audience="https://metered.example")
        with pytest.raises(RateLimitedError) as info:
            w.fetch_token(audience="https://metered.example")
    assert info.value.retry_after is not None and 1 <= info.value.retry_after <= 20
    assert "retry after" in str(info.value)


def test_broken_policy_never_takes_down_the_daemon(pd: RunningDaemon) -> None:
    path = pd.state / "policy.toml"
    good = path.read_text()
    path.write_text(good + '\n[[agent]]\nname = "x"\nselectors = ["unix:bogus:1"]\nbundles = ["demo"]\n')
    env = pd.env()
    bad = subprocess.run(badgectl_cmd("policy", "reload"), env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    line = len(good.splitlines()) + 4
    assert f"policy.toml:{line}:" in bad.stderr and "unknown selector type" in bad.stderr
    check = subprocess.run(badgectl_cmd("policy", "check", str(path)), env=env,
                           capture_output=True, text=True)
    assert check.returncode == 1 and f"policy.toml:{line}:" in check.stderr
    pd.proc.send_signal(signal.SIGHUP)
    from badged.audit import tail

    for _ in range(50):
        time.sleep(0.1)
        if any(r.get("trigger") == "SIGHUP" for r in tail(pd.state / "audit", 20)):
            break
    assert pd.proc.poll() is None
    hup = [r for r in tail(pd.state / "audit", 20) if r.get("trigger") == "SIGHUP"]
    assert hup and hup[-1]["event"] == "policy.rejected" and "unknown selector" in hup[-1]["error"]
    with WorkloadClient(pd.workload) as w:
        assert w.fetch_token(audience="demo").agent == "demo-agent"
    path.write_text(good.replace('audiences = ["demo"]', 'audiences = ["demo", "new"]', 1))
    ok = subprocess.run(badgectl_cmd("policy", "reload"), env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    with WorkloadClient(pd.workload) as w:
        assert w.fetch_token(audience="new").agent == "demo-agent"
    path.write_text(good)
    assert subprocess.run(badgectl_cmd("policy", "reload"), env=env).returncode == 0
