"""Agent lifecycle and daemon operations on a real daemon: rotate, revoke,
restart persistence, graceful shutdown, bad PIN, missing module, unsafe dirs."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import KeySet

from badgeclient import (
    AdminClient,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    WorkloadClient,
)
from badged.keystore.pkcs11.store import LIVENESS_S
from tests.e2e.conftest import badgectl_cmd, badged_cmd, start_daemon

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def _kids(jwks: dict[str, list[dict[str, str]]]) -> set[str]:
    return {k["kid"] for k in jwks["keys"]}


def test_rotate_keeps_old_key_published_and_revoke_is_immediate(fresh_state: Path) -> None:
    d = start_daemon(fresh_state)
    try:
        with WorkloadClient(d.workload) as w, AdminClient(d.admin) as a:
            old = w.fetch_token(audience="demo")
            old_sig = w.sign(b"before")
            rotated = a.rotate_agent("demo-agent")
            assert rotated.current_version == 2
            assert [k.state for k in rotated.keys] == ["retired", "active"]
            assert rotated.keys[0].publish_until >= old.expires_at
            new = w.fetch_token(audience="demo")
            assert new.key_id != old.key_id
            jwks = w.jwks()
            assert {old.key_id, new.key_id} <= _kids(jwks)
            # Tokens minted before rotation still verify until they expire.
            jwt.decode(old.token, KeySet.import_key_set(jwks), algorithms=["ES256"])  # type: ignore[arg-type]
            # Sign moves to the new key too, and names that key's PEM (the
            # daemon caches PEMs: a stale one would fail this verify).
            new_sig = w.sign(b"after")
            assert new_sig.key_id != old_sig.key_id
            assert new_sig.public_key_pem != old_sig.public_key_pem
            pub = serialization.load_pem_public_key(new_sig.public_key_pem.encode())
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            pub.verify(new_sig.signature, new_sig.signed_message, ec.ECDSA(hashes.SHA256()))

            revoked = a.revoke_agent("demo-agent", reason="compromised host")
            assert revoked.status == "revoked"
            with pytest.raises(PermissionDeniedError, match=r"revoked|no identity|does not exist"):
                w.fetch_token(audience="demo")
            with pytest.raises(PermissionDeniedError):
                w.sign(b"data")
            assert not _kids(w.jwks())
            with pytest.raises(FailedPreconditionError):
                a.revoke_agent("demo-agent")
            assert a.list_agents() == []
            assert [x.name for x in a.list_agents(include_revoked=True)] == ["demo-agent"]
        # Keys are gone from the token itself, not just hidden.
        assert "demo-agent" not in json.dumps(_token_labels(d.state))
    finally:
        d.stop()


def _token_labels(state: Path) -> list[str]:
    """Ask SoftHSM directly (separate process) which keys exist in the dev token."""
    script = f"""
import os, sys, json
sys.path[:0] = {[str(Path(__file__).resolve().parents[2] / 'daemon')]!r}
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


def test_admin_errors_and_cli(fresh_state: Path) -> None:
    d = start_daemon(fresh_state)
    try:
        with AdminClient(d.admin) as a:
            created = a.create_agent("build-bot", "CI builder")
            assert created.spiffe_id == "spiffe://example.org/agent/build-bot"
            with pytest.raises(AlreadyExistsError):
                a.create_agent("build-bot")
            with pytest.raises(NotFoundError):
                a.get_agent("nobody-here")
            with pytest.raises(InvalidRequestError):
                a.create_agent("../etc/passwd")
        env = d.env()
        shown = subprocess.run(badgectl_cmd("agent", "show", "build-bot", "--json"), env=env,
                               capture_output=True, text=True, check=True)
        assert json.loads(shown.stdout)["status"] == "active"
        listed = subprocess.run(badgectl_cmd("agent", "list"), env=env, capture_output=True,
                                text=True, check=True)
        assert "build-bot" in listed.stdout and "demo-agent" in listed.stdout
        missing = subprocess.run(badgectl_cmd("agent", "show", "ghost"), env=env,
                                 capture_output=True, text=True)
        assert missing.returncode == 1 and "not found" in missing.stderr
        who = subprocess.run(badgectl_cmd("whoami"), env=env, capture_output=True, text=True,
                             check=True)
        assert "demo-agent" in who.stdout and "policy.toml:" in who.stdout
    finally:
        d.stop()


def test_identities_persist_across_restart(fresh_state: Path) -> None:
    d = start_daemon(fresh_state)
    with WorkloadClient(d.workload) as w:
        kid_before = w.fetch_token(audience="demo").key_id
    assert d.stop() == 0
    d2 = start_daemon(fresh_state)
    try:
        with WorkloadClient(d2.workload) as w:
            assert w.fetch_token(audience="demo").key_id == kid_before
    finally:
        d2.stop()


def test_sigterm_is_graceful_and_removes_sockets(fresh_state: Path) -> None:
    d = start_daemon(fresh_state)
    assert d.workload.exists() and d.admin.exists()
    with WorkloadClient(d.workload) as w:
        jti = w.fetch_token(audience="demo").jti
    assert d.stop(signal.SIGTERM) == 0
    # The audit log verifies offline against the device key, final checkpoint included.
    audit = fresh_state / "audit"
    verify = subprocess.run(badgectl_cmd("audit", "verify", "--dir", str(audit), "--pubkey",
                                         str(fresh_state / "device-key.pem"), "--strict", "--json"),
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    tail = subprocess.run(badgectl_cmd("audit", "tail", "--dir", str(audit), "--json"),
                          capture_output=True, text=True, check=True).stdout
    events = [json.loads(line) for line in tail.splitlines() if line.strip()]
    assert any(e.get("jti") == jti and e.get("event") == "token.issued" for e in events)
    assert any(e.get("event") == "daemon.stopped" for e in events)
    assert not d.workload.exists() and not d.admin.exists()
    log = d.log_text()
    assert "shutting down" in log and "Traceback" not in log
    with WorkloadClient(d.workload) as w, pytest.raises(UnavailableError):
        w.fetch_token(audience="demo")


def test_wrong_pin_refuses_to_start_without_leaking_it(fresh_state: Path) -> None:
    d = start_daemon(fresh_state)
    d.stop()
    pin_file = fresh_state / "private" / "softhsm" / "user.pin"
    real_pin = pin_file.read_text().strip()
    pin_file.write_text("0000-wrong\n")
    proc = subprocess.run(badged_cmd("dev", "--state-dir", str(fresh_state)), capture_output=True,
                          text=True, timeout=60, env=d.env())
    assert proc.returncode == 2
    assert "token login failed" in proc.stderr
    assert "0000-wrong" not in proc.stderr + proc.stdout and real_pin not in proc.stderr


def test_missing_module_and_bad_config_are_clear(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    os.chmod(pin, 0o600)
    cfg = tmp_path / "badged.toml"
    cfg.write_text(f"""[daemon]
state_dir = "{tmp_path / 'state'}"
[keystore]
uri = "pkcs11:token=none?pin-source=file:{pin}"
module_path = "/nonexistent/libpkcs11.so"
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(badged_cmd("--config", str(cfg)), capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2 and "PKCS#11 module not found" in proc.stderr
    cfg.write_text("[daemon]\nmax_ttl = -1\n[keystore]\nuri = \"pkcs11:token=a\"\n")
    proc = subprocess.run(badged_cmd("check", "--config", str(cfg)), capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 1 and f"{cfg}:2:" in proc.stderr


def test_unsafe_state_dir_is_refused(fresh_state: Path) -> None:
    fresh_state.mkdir(parents=True)
    os.chmod(fresh_state, 0o777)
    proc = subprocess.run(badged_cmd("dev", "--state-dir", str(fresh_state)), capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2 and "writable by others" in proc.stderr
    os.chmod(fresh_state, 0o755)
    (fresh_state / "private").mkdir(mode=0o755)
    os.chmod(fresh_state / "private", 0o755)
    proc = subprocess.run(badged_cmd("dev", "--state-dir", str(fresh_state)), capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2 and "must be 0700" in proc.stderr
    assert stat.S_IMODE(os.stat(fresh_state / "private").st_mode) == 0o755  # not "fixed" silently


def test_second_daemon_on_same_socket_is_refused(fresh_state: Path) -> None:
    d = start_daemon(fresh_state)
    try:
        proc = subprocess.run(badged_cmd("dev", "--state-dir", str(fresh_state)),
                              capture_output=True, text=True, timeout=60, env=d.env())
        assert proc.returncode == 2 and "another badged is running" in proc.stderr
        with WorkloadClient(d.workload) as w:
            assert w.fetch_token(audience="demo").jti  # first daemon unaffected
    finally:
        d.stop()
    time.sleep(0)


def test_sigterm_under_load_loses_no_acknowledged_credential(fresh_state: Path) -> None:
    """Every token a client received is in the audit log, even across shutdown."""
    d = start_daemon(fresh_state)
    here = Path(__file__).parent
    procs = [subprocess.Popen([sys.executable, str(here / "load_client.py"), str(d.workload),
                               "400"], env=d.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:  # every client is mid-stream before the daemon is told to stop
        assert p.stderr is not None and p.stderr.readline().strip() == "first"
    assert d.stop(signal.SIGTERM) == 0
    jtis: list[str] = []
    errors: list[str] = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        doc = json.loads(out)
        jtis += doc["jtis"]
        errors += doc["errors"]
    assert jtis, "load should have received tokens before the shutdown"
    # Calls cut by the shutdown fail as retryable, never as anything else.
    assert all(e.startswith(("UNAVAILABLE", "CANCELLED")) for e in errors), errors[:3]
    exported = subprocess.run(badgectl_cmd("audit", "export", "--dir", str(fresh_state / "audit")),
                              capture_output=True, text=True, check=True).stdout
    logged = {json.loads(line).get("jti") for line in exported.splitlines() if line.strip()}
    assert set(jtis) <= logged


def test_token_gone_fails_closed_and_recovers_without_restart(fresh_state: Path) -> None:
    """SoftHSM's object store vanishing (token pulled) → UNAVAILABLE; back → served."""
    import shutil

    d = start_daemon(fresh_state)
    try:
        tokens = fresh_state / "private" / "softhsm" / "tokens"
        aside = fresh_state / "private" / "softhsm" / "tokens-away"
        with WorkloadClient(d.workload) as w:
            before = w.fetch_token(audience="demo")
            shutil.move(str(tokens), str(aside))
            tokens.mkdir(mode=0o700)
            # The store signs with session copies, which check the token
            # object at most every LIVENESS_S: after that, no signature.
            time.sleep(LIVENESS_S * 1.5)
            for _ in range(3):  # fails closed, repeatedly, without crashing
                with pytest.raises(UnavailableError):
                    w.fetch_token(audience="demo")
            shutil.rmtree(tokens)
            shutil.move(str(aside), str(tokens))
            after = w.fetch_token(audience="demo")
        assert after.key_id == before.key_id and d.proc.poll() is None
    finally:
        d.stop()
