"""Issue 21 end to end: context-scoped step-ups, request-chain traceability,
revocation that reaches relying parties through the Token Status List, and
people managing what they delegated. Real daemon, real processes, real uids."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from badgeclient import (
    AdminClient,
    InvalidRequestError,
    PermissionDeniedError,
    Token,
    WorkloadClient,
)
from badgeclient.credentials import CredentialClient
from badgeclient.status import StatusListChecker, file_fetcher, socket_fetcher
from badgeclient.verify import RevokedError, VerificationError
from badged.statuslist import DEFAULT_SIZE
from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon, badgectl_cmd, start_daemon

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]
HERE = Path(__file__).parent
UID = os.getuid()
PY_HASH = hashlib.sha256(Path(os.path.realpath(sys.executable)).read_bytes()).hexdigest()
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

POLICY = f"""
[bundle.demo]
audiences = ["demo"]
scopes = ["read", "write"]
kinds = ["token", "sign"]
max_ttl = "1h"

[bundle.extra]
audiences = ["https://extra.example"]
scopes = ["extra"]
max_ttl = "10m"

[bundle.prod]
audiences = ["https://prod.example"]
scopes = ["prod:write"]
max_ttl = "5m"
approval = true

# A bundle scoped to a context by the policy itself.
[bundle.ops]
audiences = ["https://ops.example"]
max_ttl = "5m"
context = {{ channel = ["#ops", "#ops-oncall"] }}

[[agent]]
name = "demo-agent"
selectors = ["unix:uid:{UID}", "unix:sha256:{PY_HASH}"]
bundles = ["demo", "ops"]

# Revoked in a test: its live tokens must be marked on the status list.
[[agent]]
name = "temp-agent"
selectors = ["unix:uid:4343"]
bundles = ["demo"]

# People delegate; a process that is an agent (this python) may not, nor
# manage delegations: the "person" in these tests runs another binary.
[delegation]
allow = ["unix:uid:{UID}", "unix:uid:65534"]

[approval]
requester_may_approve = true
"""


@pytest.fixture(scope="module")
def cd(softhsm_available: None) -> Iterator[RunningDaemon]:
    base = short_tmpdir("bcs")
    os.chmod(base, 0o755)  # like /run: nobody must reach the workload socket
    d = start_daemon(base / "s", "--approval-timeout", "15")
    (d.state / "policy.toml").write_text(POLICY)
    with AdminClient(d.admin) as a:
        assert a.reload_policy() == (True, "")
        a.create_agent("temp-agent")
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def _claims(token: Token | str, w: WorkloadClient) -> dict[str, Any]:
    raw = token.token if isinstance(token, Token) else token
    return dict(jwt.decode(raw, KeySet.import_key_set(w.jwks()),  # type: ignore[arg-type]
                           algorithms=["ES256"]).claims)


def _ctl(d: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(badgectl_cmd(*args), env=d.env(), capture_output=True, text=True,
                          timeout=60)


def _audit(d: RunningDaemon) -> list[dict[str, Any]]:
    out = []
    for f in sorted((d.state / "audit").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _device_jwks(d: RunningDaemon) -> dict[str, Any]:
    with CredentialClient(d.workload) as c:
        return {"keys": [c.trust_bundle().device_jwk]}


# -- 1. context -----------------------------------------------------------------------


def test_context_scoped_step_up_applies_only_in_its_context(cd: RunningDaemon) -> None:
    """The seed's channel step-up: an operator scopes a step-up to #deploy; the
    agent uses it there, and a prompt-injected agent asking for the same
    thing "in #random" (or without saying) is refused."""
    r = _ctl(cd, "grant", "demo-agent", "extra", "--context", "channel=#deploy", "--for", "30m",
             "--reason", "deploy window")
    assert r.returncode == 0, r.stderr
    assert "in channel=#deploy" in r.stdout
    gid = r.stdout.split()[0]
    with WorkloadClient(cd.workload) as w:
        tok = w.fetch_token(audience="https://extra.example", scopes=["extra"],
                            context={"channel": "#deploy", "task": "INC-42"})
        claims = _claims(tok, w)
        assert claims["ctx"] == {"channel": "#deploy", "task": "INC-42"}
        assert claims["txn"] == tok.txn and len(tok.txn) == 16
        assert claims["status"]["status_list"]["uri"].endswith("/status-list")
        for other in ({"channel": "#random"}, {}, {"task": "INC-42"}):
            with pytest.raises(PermissionDeniedError):
                w.fetch_token(audience="https://extra.example", scopes=["extra"], context=other)
    # An operator sees why: policy explain evaluates with a context too.
    pid = str(os.getpid())
    r = _ctl(cd, "policy", "explain", "--pid", pid, "-a", "https://extra.example",
             "--context", "channel=#deploy")
    assert r.returncode == 0 and r.stdout.startswith("ALLOW") and "in context" in r.stdout, \
        r.stdout + r.stderr
    r = _ctl(cd, "policy", "explain", "--pid", pid, "-a", "https://extra.example",
             "--context", "channel=#random")
    assert r.stdout.startswith("DENY"), r.stdout
    assert f"step-up grant {gid}: only in context channel=#deploy; the request says " \
        "channel=#random" in r.stdout, r.stdout
    # The CLI path: badgectl token --context.
    r = _ctl(cd, "token", "-a", "https://extra.example", "--context", "channel=#deploy", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["txn"]
    r = _ctl(cd, "token", "-a", "https://extra.example", "--context", "channel=#general")
    assert r.returncode != 0 and "denied" in r.stderr.lower()
    # The refusal does not tell the agent which context would have worked
    # (that would coach a prompt-injected agent); the audit record does.
    assert "#deploy" not in r.stderr, r.stderr
    denied = [x for x in _audit(cd) if x.get("event") == "token.denied"
              and (x.get("request") or {}).get("context") == {"channel": "#general"}]
    assert denied and any("only in context channel=#deploy" in t for t in denied[-1]["trace"])
    issued = [x for x in _audit(cd) if x.get("event") == "token.issued"
              and x.get("txn") == tok.txn]
    assert len(issued) == 1
    assert issued[0]["context"] == {"channel": "#deploy", "task": "INC-42"}
    assert issued[0]["grant"] == gid
    with AdminClient(cd.admin) as a:
        a.revoke_grant(gid)


def test_policy_bundle_scoped_to_context(cd: RunningDaemon) -> None:
    with WorkloadClient(cd.workload) as w:
        w.fetch_token(audience="https://ops.example", context={"channel": "#ops-oncall"})
        with pytest.raises(PermissionDeniedError):
            w.fetch_token(audience="https://ops.example", context={"channel": "#dev"})
        with pytest.raises(PermissionDeniedError):
            w.fetch_token(audience="https://ops.example")


@pytest.mark.parametrize("context,traceparent,needle", [
    ({"channel": "a", "task": "b", "session": "c", "on_behalf_of": "d", "x": "e"}, "",
     "at most 4"),
    ({"repo": "x"}, "", "unknown key"),
    ({"channel": "#" + "a" * 128}, "", "1-128 printable"),
    ({"channel": "#de ploy"}, "", "no spaces"),
    ({"channel": ""}, "", "1-128 printable"),
    ({}, "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "traceparent"),
    ({}, "not-a-traceparent", "traceparent"),
])
def test_malformed_context_is_invalid_argument(cd: RunningDaemon, context: dict[str, str],
                                               traceparent: str, needle: str) -> None:
    with WorkloadClient(cd.workload) as w, pytest.raises(InvalidRequestError) as exc:
        w.fetch_token(audience="demo", context=context, traceparent=traceparent)
    assert exc.value.status == "INVALID_ARGUMENT"
    assert needle in str(exc.value)


def test_cli_context_without_equals_is_a_usage_error(cd: RunningDaemon) -> None:
    r = _ctl(cd, "token", "-a", "demo", "--context", "channel")
    assert r.returncode == 2 and "key=value" in r.stderr


# -- 2. approvals show the context; traceability ---------------------------------------


def test_approval_shows_context_and_audit_trace_tells_the_chain(cd: RunningDaemon) -> None:
    with AdminClient(cd.admin) as a:
        g = a.grant_bundle("demo-agent", "prod", duration_seconds=600, reason="release 7",
                           context={"task": "REL-7"})
        assert g.context == {"task": "REL-7"}
        out: dict[str, object] = {}

        def run() -> None:
            try:
                with WorkloadClient(cd.workload) as w:
                    out["token"] = w.fetch_token(
                        audience="https://prod.example", scopes=["prod:write"],
                        reason="ship it", context={"task": "REL-7", "channel": "#release"},
                        traceparent=TRACEPARENT)
            except Exception as exc:  # surfaced by the assertions below
                out["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        pending = []
        for _ in range(200):
            pending = [x for x in a.list_approvals() if x.state == "pending"]
            if pending:
                break
            time.sleep(0.05)
        assert pending, "no approval appeared"
        item = pending[0]
        assert item.context == {"channel": "#release", "task": "REL-7"} and item.txn
        shown = _ctl(cd, "approvals")
        assert "context (asserted by the agent, not verified): channel=#release,task=REL-7" \
            in shown.stdout, shown.stdout
        a.decide_approval(item.id, approve=True)
        t.join(30)
        tok = out.get("token")
        assert isinstance(tok, Token), out
        assert tok.txn == item.txn
        a.revoke_grant(g.id)
    r = _ctl(cd, "audit", "trace", tok.txn, "--dir", str(cd.state / "audit"))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for needle in ("grant.created", g.id, "approval.granted", "approval.decided", item.id,
                   "token.issued", "context (asserted by the agent): channel=#release",
                   "process: pid=", f"traceparent: {TRACEPARENT}", "bundle: prod",
                   "status.marked"):
        assert needle in text, (needle, text)
    roles = [line.split()[0] for line in text.splitlines() if not line.startswith(" ")]
    assert roles.index("grant") < roles.index("approval") < roles.index("credential") \
        < roles.index("revocation"), roles
    # The caller's trace id finds the same chain (it joins the agent's own traces).
    by_trace = _ctl(cd, "audit", "trace", TRACEPARENT[3:35], "--dir", str(cd.state / "audit"),
                    "--json")
    assert by_trace.returncode == 0
    assert tok.txn in {json.loads(x).get("txn") for x in by_trace.stdout.splitlines()}
    missing = _ctl(cd, "audit", "trace", "0123456789abcdef", "--dir", str(cd.state / "audit"))
    assert missing.returncode == 1


# -- 3. status list --------------------------------------------------------------------

VERIFIER = r"""
import json, sys, time
from badgeclient.status import StatusListChecker, socket_fetcher
from badgeclient.verify import Verifier, VerificationError
sock, token, jwks, device, audience, max_age = sys.argv[1:7]
checker = StatusListChecker(fetch=socket_fetcher(sock), keys=json.loads(device),
                            max_age=float(max_age))
v = Verifier(jwks=json.loads(jwks), status=checker, single_use_tokens=False)
end = time.time() + 30
while time.time() < end:
    try:
        v.verify_token(token, audience=audience)
        print("ok", time.time(), flush=True)
    except VerificationError as e:
        print("refused", time.time(), e.reason, checker.fetches, flush=True)
        break
    time.sleep(0.05)
"""


def test_mid_life_revocation_reaches_a_polling_verifier_within_max_age(
        cd: RunningDaemon) -> None:
    """An independent verifier process polls the daemon's status list; a grant
    revoked mid-life is refused within its max age (measured)."""
    max_age = 2.0
    with AdminClient(cd.admin) as a, WorkloadClient(cd.workload) as w:
        g = a.grant_bundle("demo-agent", "extra", duration_seconds=600, reason="window")
        tok = w.fetch_token(audience="https://extra.example", ttl_seconds=600)
        jwks = json.dumps(w.jwks())
        proc = subprocess.Popen(
            [sys.executable, "-c", VERIFIER, str(cd.workload), tok.token, jwks,
             json.dumps(_device_jwks(cd)), "https://extra.example", str(max_age)],
            env=cd.env(), stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        assert first[0] == "ok", first
        time.sleep(0.5)
        revoked_at = time.time()
        a.revoke_grant(g.id)
        line: list[str] = []
        for raw in proc.stdout:
            line = raw.split()
            if line[0] != "ok":
                break
        proc.wait(10)
    assert line[:1] == ["refused"] and line[2] == "status_revoked", line
    latency = float(line[1]) - revoked_at
    print(f"\nstatus-list revocation reached the verifier in {latency:.2f}s (max_age {max_age}s)")
    assert latency <= max_age + 1.0, latency
    marks = [x for x in _audit(cd) if x.get("event") == "status.marked" and x.get("grant") == g.id]
    assert marks and marks[0]["marked"] >= 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as uid 4343")
def test_revoking_an_agent_marks_its_live_tokens(cd: RunningDaemon) -> None:
    import base64

    got = _as(4343, cd, "token", "demo")
    assert got["ok"], got
    payload = got["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    checker = StatusListChecker(fetch=socket_fetcher(cd.workload), keys=_device_jwks(cd),
                                max_age=0.01)
    checker.check(claims)  # valid while the agent is
    with AdminClient(cd.admin) as a:
        a.revoke_agent("temp-agent", reason="compromised")
    time.sleep(0.02)
    with pytest.raises(RevokedError):
        checker.check(claims)


def test_status_list_format_and_stale_list_refused(cd: RunningDaemon, tmp_path: Path) -> None:
    """The exported list follows the draft, and a relying party fed a stale
    list (an attacker replaying the pre-revocation file) stops trusting it at
    its exp; a list it cannot refresh after max_age fails closed."""
    import base64
    import zlib

    out = tmp_path / "status.jwt"
    r = _ctl(cd, "status-list", "export", "-o", str(out))
    assert r.returncode == 0, r.stderr
    token = out.read_text().strip()
    header, payload, _ = token.split(".")
    h = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    p = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert h["typ"] == "statuslist+jwt" and h["alg"] == "ES256"
    assert p["sub"].endswith("/status-list") and p["status_list"]["bits"] == 1
    lst = p["status_list"]["lst"]
    bits = zlib.decompress(base64.urlsafe_b64decode(lst + "=" * (-len(lst) % 4)))
    assert len(bits) == DEFAULT_SIZE // 8
    assert p["exp"] > p["iat"] and "ttl" in p
    device = _device_jwks(cd)
    uri = p["sub"]
    claims = {"status": {"status_list": {"idx": DEFAULT_SIZE - 1, "uri": uri}}}  # never issued
    # Stale: the same file checked later than its exp is refused.
    later = StatusListChecker(fetch=file_fetcher(out), keys=device, max_age=1,
                              clock=lambda: p["exp"] + 3600)
    with pytest.raises(VerificationError) as exc:
        later.check(claims)
    assert exc.value.reason == "status_unavailable"
    # Cut off from the daemon after max_age: refused, not silently accepted.
    now = [0.0]
    cut = StatusListChecker(fetch=file_fetcher(out), keys=device, max_age=5,
                            monotonic=lambda: now[0])
    cut.check(claims)
    out.unlink()
    now[0] = 6.0
    with pytest.raises(VerificationError) as exc:
        cut.check(claims)
    assert exc.value.reason == "status_unavailable"
    # Signed by the device key only: an agent's JWKS does not verify it.
    with WorkloadClient(cd.workload) as w:
        wrong = StatusListChecker(fetch=socket_fetcher(cd.workload), keys=w.jwks())
    with pytest.raises(VerificationError):
        wrong.check(claims)
    # A token without a status claim is refused unless the RP opts out.
    with pytest.raises(VerificationError) as exc:
        cut.check({})
    assert exc.value.reason == "status_missing"


# -- 4. people manage what they delegated ----------------------------------------------


def _person(tmp_path: Path, d: RunningDaemon, *args: str) -> dict[str, Any]:
    """Same uid, another binary (a copy of python with one byte appended):
    matches no agent rule, so the daemon sees a person, not demo-agent."""
    person = tmp_path / "person-python"
    if not person.exists():
        shutil.copy(os.path.realpath(sys.executable), person)
        with open(person, "ab") as fh:
            fh.write(b"\0person")
    env = {**d.env(), "PYTHONHOME": sys.base_prefix,
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    r = subprocess.run([str(person), str(HERE / "as_user_delegations.py"), str(UID),
                        str(d.workload), *args], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _as(uid: int, d: RunningDaemon, *args: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, str(HERE / "as_user_delegations.py"), str(uid),
                        str(d.workload), *args], env=d.env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")
def test_people_list_and_revoke_only_their_own_delegations(cd: RunningDaemon,
                                                           tmp_path: Path) -> None:
    made = _person(tmp_path, cd, "delegate", "demo-agent")
    assert made["ok"], made
    did = made["id"]
    # The agent acts under it; its token is live.
    with WorkloadClient(cd.workload) as w:
        tok = w.fetch_token(audience="demo", scopes=["read"], delegation=did)
    idx = _claims(tok, WorkloadClient(cd.workload))["status"]["status_list"]["idx"]
    # Attack 1: the agent process (this python, demo-agent) lists or revokes.
    with WorkloadClient(cd.workload) as w:
        with pytest.raises(PermissionDeniedError):
            w.my_delegations()
        with pytest.raises(PermissionDeniedError):
            w.revoke_my_delegation(did)
    # Attack 2: another uid (nobody) lists (sees nothing) and revokes (not found).
    other = _as(65534, cd, "list")
    assert other == {"ok": True, "ids": []}, other
    other = _as(65534, cd, "revoke", did)
    assert other["ok"] is False and other["status"] == "NOT_FOUND", other
    # Neither attack ended it.
    mine = _person(tmp_path, cd, "list")
    assert mine["ids"] == [did], mine
    with WorkloadClient(cd.workload) as w:
        w.fetch_token(audience="demo", scopes=["read"], delegation=did)
    # The person ends it: refused for the agent, and marked on the status list.
    gone = _person(tmp_path, cd, "revoke", did)
    assert gone["ok"] and gone["revoked"], gone
    with WorkloadClient(cd.workload) as w, pytest.raises(PermissionDeniedError):
        w.fetch_token(audience="demo", scopes=["read"], delegation=did)
    checker = StatusListChecker(fetch=socket_fetcher(cd.workload), keys=_device_jwks(cd))
    with pytest.raises(RevokedError):
        checker.check({"status": {"status_list": {
            "idx": idx, "uri": _claims(tok, WorkloadClient(cd.workload))["status"]
            ["status_list"]["uri"]}}})
    # CLI: badgectl delegations list --mine, as the agent: refused, exit 1 or 3.
    r = _ctl(cd, "delegations", "list", "--mine")
    assert r.returncode != 0 and "agent process" in r.stderr, r.stderr


def test_badgectl_verify_checks_the_status_list_from_socket_or_file(
        cd: RunningDaemon, tmp_path: Path) -> None:
    """``badgectl verify --status-list``: a revoked token is refused through the
    socket and through a fresh export; an old export is refused by its age, not
    trusted to say "valid"; a file needs pinned device keys."""
    with AdminClient(cd.admin) as a, WorkloadClient(cd.workload) as w:
        g = a.grant_bundle("demo-agent", "extra", duration_seconds=600, reason="cli verify")
        tok = w.fetch_token(audience="https://extra.example", ttl_seconds=600).token
        (tmp_path / "jwks.json").write_text(json.dumps(w.jwks()))
    (tmp_path / "device.jwks").write_text(json.dumps(_device_jwks(cd)))
    old = tmp_path / "old.jwt"
    assert _ctl(cd, "status-list", "export", "-o", str(old)).returncode == 0

    def verify(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            badgectl_cmd("verify", "--jwks", str(tmp_path / "jwks.json"),
                         "-a", "https://extra.example", *args, tok),
            env=cd.env(), capture_output=True, text=True, timeout=60)

    r = verify("--status-list", "socket")
    assert r.returncode == 0, r.stderr
    r = verify("--status-list", str(old), "--status-keys", str(tmp_path / "device.jwks"))
    assert r.returncode == 0, r.stderr
    r = verify("--status-list", str(old))
    assert r.returncode == 2 and "--status-keys" in r.stderr
    with AdminClient(cd.admin) as a:
        a.revoke_grant(g.id)
    r = verify("--status-list", "socket")
    assert r.returncode == 1 and "status_revoked" in r.stderr, r.stderr
    fresh = tmp_path / "fresh.jwt"
    assert _ctl(cd, "status-list", "export", "-o", str(fresh)).returncode == 0
    r = verify("--status-list", str(fresh), "--status-keys", str(tmp_path / "device.jwks"))
    assert r.returncode == 1 and "status_revoked" in r.stderr, r.stderr
    # The pre-revocation file still says "valid": only its age can refuse it.
    iat = json.loads(base64.urlsafe_b64decode(
        old.read_text().split(".")[1] + "==="))["iat"]
    time.sleep(max(0.0, iat + 2.2 - time.time()))
    r = verify("--status-list", str(old), "--status-keys", str(tmp_path / "device.jwks"),
               "--status-max-age", "1")
    assert r.returncode == 1 and "status_stale" in r.stderr, r.stderr
    # Device keys that did not sign the list: refused, never "valid".
    r = verify("--status-list", "socket", "--status-keys", str(tmp_path / "jwks.json"))
    assert r.returncode == 1 and "status_unavailable" in r.stderr, r.stderr
