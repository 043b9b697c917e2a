"""Session-key mode on real daemons, over SoftHSM and swtpm.

Each test starts ``badged`` as its own process (``badged dev`` with
``--signing-mode session``, or ``badged --config`` on a swtpm the test owns so
it can kill it) and checks what a relying party sees: tokens verified by
joserfc against the JWKS, plus the documented chain check
(badgeclient.session_verify) with the hardware key pinned from the admin API.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from badgeclient import AdminClient, PermissionDeniedError, UnavailableError, WorkloadClient
from badgeclient.session_verify import JWKS_MEMBER, jwk_to_key, verify_session_chain
from tests.conftest import ROOT, require_or_skip, short_tmpdir
from tests.e2e.conftest import RunningDaemon, _pythonpath, badgectl_cmd, start_daemon
from tests.tpm_fixtures import SwtpmInstance

pytestmark = pytest.mark.slow


def _joserfc(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """A stock JOSE library, knowing nothing of session keys."""
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])  # type: ignore[arg-type]
    jwt.JWTClaimsRegistry(now=int(time.time()), leeway=30, exp={"essential": True}).validate(
        decoded.claims)
    return dict(decoded.claims)


def _pinned(admin: AdminClient, jwks: dict[str, Any], agent: str) -> dict[str, Any]:
    """The hardware keys of ``agent``, named by the operator channel, not the JWKS."""
    kids = {k.token_kid for k in admin.get_agent(agent).keys}
    return {e["kid"]: jwk_to_key(e) for e in jwks["keys"] if e["kid"] in kids}


def _session_kids(jwks: dict[str, Any]) -> set[str]:
    return {e["kid"] for e in jwks["keys"] if JWKS_MEMBER in e}


@pytest.fixture(params=["softhsm", pytest.param("tpm", marks=pytest.mark.tpm)])
def session_daemon(request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    """``badged dev --signing-mode session`` on SoftHSM, ``--backend tpm`` on a dev swtpm."""
    if request.param == "softhsm":
        if shutil.which("softhsm2-util") is None:
            require_or_skip(request.config, "softhsm2-util not installed")
        args: tuple[str, ...] = ("--signing-mode", "session")
    else:
        from badged.swtpm import missing_tooling

        missing = missing_tooling()
        if missing:
            require_or_skip(request.config, missing)
        args = ("--backend", "tpm")  # session mode is the tpm default
    base = short_tmpdir("bss")
    d = start_daemon(base / "s", *args)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_tokens_verify_with_joserfc_and_chain_to_the_hardware_key(session_daemon: RunningDaemon) -> None:
    d = session_daemon
    with WorkloadClient(d.workload) as wl, AdminClient(d.admin) as admin:
        tokens = [wl.fetch_token(audience="demo", scopes=["read"]) for _ in range(20)]
        jwks = wl.jwks()
        pinned = _pinned(admin, jwks, "demo-agent")
    assert len({t.key_id for t in tokens}) == 1  # one session key, certified once
    assert tokens[0].key_id in _session_kids(jwks)
    assert tokens[0].key_id not in pinned  # not signed by the hardware key itself
    for t in tokens:
        claims = _joserfc(t.token, jwks)
        chain = verify_session_chain(t.token, jwks, now=time.time(), hardware_keys=pinned)
        assert chain.agent == claims["sub"] == t.spiffe_id
    # The certification costs one hardware signature, not one per token.
    assert d.log_text().count("session key certified") == 1


def test_revocation_drops_the_session_key_at_once(session_daemon: RunningDaemon) -> None:
    d = session_daemon
    with WorkloadClient(d.workload) as wl, AdminClient(d.admin) as admin:
        tok = wl.fetch_token(audience="demo", scopes=["read"])
        assert tok.key_id in _session_kids(wl.jwks())
        admin.revoke_agent("demo-agent", "test")
        jwks = wl.jwks()
        assert _session_kids(jwks) == set() and jwks["keys"] == []
        with pytest.raises(PermissionDeniedError):
            wl.fetch_token(audience="demo", scopes=["read"])
    assert "session keys dropped" in d.log_text()
    persisted = json.loads((d.state / "private" / "session-keys.json").read_text())
    assert persisted["keys"] == []


def test_rotation_publishes_new_key_and_keeps_the_old(session_daemon: RunningDaemon) -> None:
    d = session_daemon
    with WorkloadClient(d.workload) as wl, AdminClient(d.admin) as admin:
        old = wl.fetch_token(audience="demo", scopes=["read"])
        subprocess.run(badgectl_cmd("agent", "rotate", "demo-agent"), env=d.env(), check=True,
                       capture_output=True)
        new = wl.fetch_token(audience="demo", scopes=["read"])
        jwks = wl.jwks()
        pinned = _pinned(admin, jwks, "demo-agent")  # both hardware versions
    assert new.key_id != old.key_id
    assert {old.key_id, new.key_id} <= _session_kids(jwks)
    for t in (old, new):
        _joserfc(t.token, jwks)
        verify_session_chain(t.token, jwks, now=time.time(), hardware_keys=pinned)
    # A restarted daemon republishes the old public key (its tokens still live),
    # but never gets the private key back.
    d.stop()
    again = start_daemon(d.state, *_dev_args(d))
    try:
        with WorkloadClient(again.workload) as wl:
            jwks2 = wl.jwks()
            assert {old.key_id, new.key_id} <= _session_kids(jwks2)
            _joserfc(old.token, jwks2)
            assert wl.fetch_token(audience="demo", scopes=["read"]).key_id not in {old.key_id,
                                                                                   new.key_id}
    finally:
        again.stop()


def _dev_args(d: RunningDaemon) -> tuple[str, ...]:
    backend = (d.state / "private" / "dev-backend").read_text().strip()
    return ("--backend", "tpm") if backend == "tpm" else ("--signing-mode", "session")


def test_time_based_rotation_on_softhsm_config(request: pytest.FixtureRequest) -> None:
    """A 2 s period from the config file: keys change by themselves, each new
    key is in the JWKS before its first token, every token verifies, and old
    keys stay published while their tokens live."""
    from badged.softhsm import provision

    if shutil.which("softhsm2-util") is None:
        require_or_skip(request.config, "softhsm2-util not installed")
    base = short_tmpdir("bsr")
    try:
        state = base / "s"
        state.mkdir(mode=0o755)
        token = provision(base / "hsm", label="badged-rot")
        cfg = _write_config(state, keystore=f"""backend = "pkcs11"
uri = "{token.uri()}"
module_path = "{token.module_path}"
signing_mode = "session"
session_key_period = 2
""")
        d = _start_config_daemon(state, cfg, extra_env={"SOFTHSM2_CONF": str(token.conf_path)})
        try:
            _create_agent(d)
            seen: dict[str, list[str]] = {}
            published_before_use: dict[str, bool] = {}
            deadline = time.monotonic() + 30
            with WorkloadClient(d.workload) as wl:
                while len(seen) < 4 and time.monotonic() < deadline:
                    before = _session_kids(wl.jwks())  # what a relying party cached
                    t = wl.fetch_token(audience="demo", scopes=["read"])
                    if t.key_id not in seen:
                        published_before_use[t.key_id] = t.key_id in before
                    seen.setdefault(t.key_id, []).append(t.token)
                    time.sleep(0.05)
                jwks = wl.jwks()
            assert len(seen) >= 4, "session key never rotated"
            _first, *later = list(published_before_use)  # the first key cannot be
            assert all(published_before_use[k] for k in later), published_before_use
            assert set(seen) <= _session_kids(jwks)
            for tokens in seen.values():
                for tok in tokens:
                    _joserfc(tok, jwks)
                    verify_session_chain(tok, jwks, now=time.time())
        finally:
            d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- killing swtpm under load ------------------------------------------------------------

def _write_config(state: Path, *, keystore: str) -> Path:
    from badged.dev import dev_policy

    (state / "policy.toml").write_text(dev_policy("demo-agent", os.getuid()))
    cfg = state / "badged.toml"
    cfg.write_text(f"""[daemon]
state_dir = "{state}"
workload_socket = "{state}/run/agent.sock"
admin_socket = "{state}/run/admin.sock"
policy_file = "{state}/policy.toml"
default_ttl = "60s"
max_ttl = "60s"

[keystore]
{keystore}
""")
    return cfg


def _start_tpm_daemon(base: Path, *, tcti: str, key_dir: Path, extra: str = "") -> RunningDaemon:
    """A daemon from a config file with a tpm keystore; its state dir is ``base/d``."""
    state = base / "d"
    state.mkdir(mode=0o755)
    cfg = _write_config(state, keystore=f'backend = "tpm"\ntcti = "{tcti}"\n'
                                        f'key_dir = "{key_dir}"\n{extra}')
    return _start_config_daemon(state, cfg)


def _start_config_daemon(state: Path, cfg: Path, extra_env: dict[str, str] | None = None,
                         timeout: float = 30) -> RunningDaemon:
    log = state.parent / f"{state.name}.log"
    env = dict(os.environ, PYTHONPATH=_pythonpath(), **(extra_env or {}))
    with open(log, "ab") as log_fh:
        proc = subprocess.Popen([sys.executable, "-m", "badged", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=log_fh, env=env)
    assert proc.stdout is not None
    deadline, buf = time.monotonic() + timeout, b""
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            buf += os.read(proc.stdout.fileno(), 4096)
            if b"badged ready" in buf:
                return RunningDaemon(state, proc, log)
    proc.kill()
    proc.wait()
    raise AssertionError(f"daemon did not start: {buf!r}\n{log.read_text(errors='replace')}")


def _create_agent(d: RunningDaemon) -> None:
    with AdminClient(d.admin) as admin:
        admin.create_agent("demo-agent")


def _fetch_until_ok(sock: Path, deadline_s: float = 20) -> Any:
    """Recovery without a restart: the first calls after swtpm returns may
    still see the old connection fail; a deadline, not a sleep, bounds it."""
    deadline = time.monotonic() + deadline_s
    with WorkloadClient(sock) as wl:
        while True:
            try:
                return wl.fetch_token(audience="demo", scopes=["read"])
            except UnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _wait_first(procs: list[subprocess.Popen[bytes]], deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    for p in procs:
        assert p.stderr is not None
        buf = b""
        while b"first" not in buf:
            assert time.monotonic() < deadline, "a loader never got a token"
            if select.select([p.stderr], [], [], 0.2)[0]:
                chunk = os.read(p.stderr.fileno(), 4096)
                assert chunk, f"loader exited: {buf!r}"
                buf += chunk


@pytest.mark.tpm
@pytest.mark.parametrize(("mode", "period"), [("direct", 300), ("session", 300), ("session", 1)])
def test_killing_swtpm_under_load_loses_no_acknowledged_credential(
        mode: str, period: int, swtpm_instance: SwtpmInstance) -> None:
    """Every jti a client received is in the audit log, through a TPM power cut.

    In direct mode requests during the cut fail with UNAVAILABLE; in session
    mode they keep being served from the in-memory key (with a 1 s period,
    rotations also hit the dead TPM: served from the current key until its
    use_until, then UNAVAILABLE). Either way, after swtpm returns the same
    daemon serves again and the audit log holds every acknowledged credential.
    """
    base = swtpm_instance.base
    d = _start_tpm_daemon(base, tcti=swtpm_instance.tcti, key_dir=swtpm_instance.key_dir,
                          extra=f'signing_mode = "{mode}"\nsession_key_period = {period}\n')
    state = d.state
    received: list[str] = []
    loaders: list[subprocess.Popen[bytes]] = []
    stop_file = base / "stop"
    try:
        _create_agent(d)
        env = dict(os.environ, PYTHONPATH=_pythonpath())
        loaders = [subprocess.Popen([sys.executable, str(ROOT / "tests/session/loader.py"),
                                     str(d.workload), str(stop_file)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                   for _ in range(4)]
        _wait_first(loaders)
        swtpm_instance.kill()
        with WorkloadClient(d.workload) as wl:
            if mode == "direct":
                with pytest.raises(UnavailableError):  # fails closed while the TPM is gone
                    wl.fetch_token(audience="demo", scopes=["read"])
            elif period > 1:  # the certified in-memory key keeps serving
                tok = wl.fetch_token(audience="demo", scopes=["read"])
                received.append(tok.jti)
                verify_session_chain(tok.token, wl.jwks(), now=time.time())
        # Let the load run against the dead TPM, past a use_until when the
        # period is short (a pause, not an assertion).
        time.sleep(0.3 if period > 1 else 1.5)
        swtpm_instance.start()
        received.append(_fetch_until_ok(d.workload).jti)
        stop_file.touch()
        errors: list[str] = []
        for p in loaders:
            out, _ = p.communicate(timeout=60)
            result = json.loads(out.decode().strip().splitlines()[-1])
            received += result["jtis"]
            errors += result["errors"]
        assert all(e.startswith("UNAVAILABLE") for e in errors), errors[:5]
        print(f"{mode}/{period}s: {len(received)} tokens received, {len(errors)} UNAVAILABLE during the cut")
    finally:
        stop_file.touch()
        for p in loaders:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert d.stop() == 0, d.log_text()[-2000:]
    out = subprocess.run(badgectl_cmd("audit", "export", "--dir", str(state / "audit")),
                         env=d.env(), capture_output=True, check=True).stdout
    records = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    audited = {r.get("jti") for r in records}
    missing = set(received) - audited
    assert received and not missing, f"{len(missing)} acknowledged tokens not audited"
    # Every token's kid resolves, in the same log, to a hardware-certified key.
    certified = {r["kid"] for r in records if r["event"] == "session_key.certified"}
    token_kids = {r["kid"] for r in records if r["event"] == "token.issued"}
    if mode == "session":
        assert certified and token_kids <= certified
    else:
        assert not certified


@pytest.mark.tpm
def test_session_token_chains_to_a_tpm_attested_key(swtpm_instance: SwtpmInstance) -> None:
    """The whole chain on a real TPM, each link checked by code badged does not run:
    EK certificate → (credential activation) AK → TPM2_Certify of the agent's
    token key → certification JWS → session key → token (joserfc).

    The relying party pins the hardware key only after the TPM proved it
    resident; the JWKS alone is not trusted for it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

    from badged.core import tpm_evidence as te
    from badged.keystore.tpm.store import TpmConfig, TpmKeyStore

    # session mode: the tpm default
    d = _start_tpm_daemon(swtpm_instance.base, tcti=swtpm_instance.tcti,
                          key_dir=swtpm_instance.key_dir)
    try:
        _create_agent(d)
        with WorkloadClient(d.workload) as wl, AdminClient(d.admin) as admin:
            tok = wl.fetch_token(audience="demo", scopes=["read"])
            jwks = wl.jwks()
            version = admin.get_agent("demo-agent").current_version
    finally:
        assert d.stop() == 0
    # The verifier's side, on the same TPM (the daemon has released it).
    store = TpmKeyStore.from_config(TpmConfig(tcti=swtpm_instance.tcti,
                                              key_dir=str(swtpm_instance.key_dir)))
    try:
        ek_der = store.ek_certificate()
        assert ek_der is not None
        ek_key = x509.load_der_x509_certificate(ek_der).public_key()
        assert isinstance(ek_key, rsa.RSAPublicKey)
        ak_name = te.tpm_name(store.ak_public())
        challenge = te.make_credential(ek_key, ak_name)
        assert store.activate_credential(challenge.credential_blob,
                                         challenge.encrypted_secret) == challenge.secret
        nonce = os.urandom(32)
        evidence = store.attest(f"badged/agent/demo-agent/v{version}/tok", nonce)
    finally:
        store.close()
    ca = x509.load_pem_x509_certificate(swtpm_instance.provisioned.root_ca_cert.read_bytes())
    issuer = x509.load_pem_x509_certificate(swtpm_instance.provisioned.issuer_cert.read_bytes())
    verified = te.verify_certify(evidence, nonce, trusted_ak_names={ak_name},
                                 ek_ca_keys=[ca.public_key()],  # type: ignore[list-item]
                                 ek_intermediates=[issuer])
    from badged.core.jose import ec_public_jwk, jwk_thumbprint

    attested = {jwk_thumbprint(ec_public_jwk(verified.public_key)): verified.public_key}
    claims = _joserfc(tok.token, jwks)
    chain = verify_session_chain(tok.token, jwks, now=time.time(), hardware_keys=attested)
    assert chain.hardware_kid in attested and chain.agent == claims["sub"]
    # A token whose certification chains to any other key is refused.
    from badgeclient.session_verify import SessionChainError

    other = _pinned_other()
    with pytest.raises(SessionChainError) as err:
        verify_session_chain(tok.token, jwks, now=time.time(), hardware_keys=other)
    assert err.value.reason == "untrusted_hardware_key"


def _pinned_other() -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec

    from badged.core.jose import ec_public_jwk, jwk_thumbprint

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {jwk_thumbprint(ec_public_jwk(key)): key}


def test_switching_back_to_direct_mode_keeps_live_session_tokens_verifiable(
        request: pytest.FixtureRequest) -> None:
    if shutil.which("softhsm2-util") is None:
        require_or_skip(request.config, "softhsm2-util not installed")
    base = short_tmpdir("bsw")
    try:
        d = start_daemon(base / "s", "--signing-mode", "session")
        with WorkloadClient(d.workload) as wl:
            old = wl.fetch_token(audience="demo", scopes=["read"])
        d.stop()
        d = start_daemon(base / "s")  # direct: the softhsm default
        try:
            with WorkloadClient(d.workload) as wl, AdminClient(d.admin) as admin:
                new = wl.fetch_token(audience="demo", scopes=["read"])
                jwks = wl.jwks()
                hw_kid = admin.get_agent("demo-agent").keys[-1].token_kid
            assert new.key_id == hw_kid  # the hardware key signs again
            assert _session_kids(jwks) == {old.key_id}  # still published: its token lives
            _joserfc(old.token, jwks)
            verify_session_chain(old.token, jwks, now=time.time(),
                                 hardware_keys=_pinned_from(jwks, hw_kid))
            _joserfc(new.token, jwks)
        finally:
            d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _pinned_from(jwks: dict[str, Any], kid: str) -> dict[str, Any]:
    return {e["kid"]: jwk_to_key(e) for e in jwks["keys"] if e["kid"] == kid}


def test_verifier_library_checks_the_session_chain(session_daemon: RunningDaemon) -> None:
    """badgeclient.verify runs the chain check itself for session-key tokens."""
    from badgeclient.verify import UntrustedKeyError, Verifier

    d = session_daemon
    with WorkloadClient(d.workload) as wl, AdminClient(d.admin) as admin:
        tok = wl.fetch_token(audience="demo", scopes=["read"])
        jwks = wl.jwks()
        pinned = _pinned(admin, jwks, "demo-agent")
    ok = Verifier(jwks=jwks, hardware_keys=pinned).verify_token(tok.token, audience="demo")
    assert ok.agent == tok.spiffe_id and ok.key_id in _session_kids(jwks)
    # Pinning other hardware keys (say, another device's): the chain no longer holds.
    with pytest.raises(UntrustedKeyError, match="session key chain"):
        Verifier(jwks=jwks, hardware_keys={}).verify_token(tok.token, audience="demo")
    # A certification swapped onto the entry is refused as well.
    forged = json.loads(json.dumps(jwks))
    for entry in forged["keys"]:
        if JWKS_MEMBER in entry:
            head, body, sig = entry[JWKS_MEMBER].split(".")
            entry[JWKS_MEMBER] = f"{head}.{body}.{sig[::-1]}"
    with pytest.raises(UntrustedKeyError, match="session key chain"):
        Verifier(jwks=forged).verify_token(tok.token, audience="demo")


# -- a slow TPM does not stall the daemon -------------------------------------------------

def test_slow_tpm_signature_does_not_stall_other_calls(swtpm_instance: SwtpmInstance) -> None:
    """Direct mode at real-TPM speed: while a token is being signed (~0.5 s per
    TPM command here), calls that need no TPM are answered at once.

    Hardware signatures run on the daemon's signing thread for the tpm
    backend (service/deps.py SigningRunner); on the event loop they blocked
    every call on both sockets for the length of each signature.
    """
    base = swtpm_instance.base
    delay_file = base / "delay"
    delay_file.write_text("0")
    relay = subprocess.Popen([sys.executable, str(ROOT / "tests/session/slow_tpm.py"),
                              str(base / "r"), swtpm_instance.tcti.split("path=", 1)[1],
                              f"@{delay_file}"], stdout=subprocess.PIPE)
    try:
        assert relay.stdout is not None and b"ready" in relay.stdout.readline()
        d = _start_tpm_daemon(base, tcti=f"swtpm:path={base / 'r'}",
                              key_dir=swtpm_instance.key_dir, extra='signing_mode = "direct"\n')
        try:
            _create_agent(d)
            with WorkloadClient(d.workload) as wl:
                wl.fetch_token(audience="demo", scopes=["read"])  # keys loaded, at full speed
            delay_file.write_text("0.5")
            slow = subprocess.Popen(
                [sys.executable, "-c", "import sys, time\n"
                 "from badgeclient import WorkloadClient\n"
                 "with WorkloadClient(sys.argv[1], timeout=60) as c:\n"
                 "    t = time.monotonic(); c.fetch_token(audience='demo', scopes=['read'])\n"
                 "    print(time.monotonic() - t)", str(d.workload)],
                stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=_pythonpath()))
            time.sleep(0.3)  # the slow call is now inside its TPM signature
            with WorkloadClient(d.workload) as wl, AdminClient(d.admin) as admin:
                timings = []
                for _ in range(3):
                    t = time.monotonic()
                    wl.whoami()
                    assert wl.jwks()["keys"]
                    admin.list_agents()
                    timings.append(time.monotonic() - t)
            slow_s = float(slow.communicate(timeout=60)[0])
            assert slow_s >= 0.5, f"the TPM was not slow ({slow_s:.2f} s)"
            assert max(timings) < 0.25, f"calls stalled behind the TPM: {timings}"
        finally:
            delay_file.write_text("0")
            d.stop()
    finally:
        relay.terminate()
        relay.wait()
