"""Session-key mode as pure tables: schedule, certification checks, the manager.

No daemon, no hardware: a MemoryKeyStore stands in for the token (the same
manager runs on SoftHSM and swtpm in test_session_e2e.py) and the clock is a
FixedClock, so every expiry and rotation rule is exercised without sleeping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from badgeclient.session_verify import SessionChainError, verify_session_chain
from badged.core import session_keys as sk
from badged.core.clock import FixedClock
from badged.core.jose import b64url, b64url_decode, canonical_json, ec_public_jwk, jwk_thumbprint
from badged.core.tokens import build_claims, mint_token
from badged.errors import FailedPreconditionError, KeyStoreUnavailableError
from badged.identity.registry import AgentRegistry
from badged.identity.session import SessionKeyManager
from badged.identity.store import AgentStore
from badged.keystore.memory import MemoryKeyStore
from badged.keystore.port import KeyHandle

T0 = 1_800_000_000
ISS = "spiffe://example.org/badged"
SUB = "spiffe://example.org/agent/bot"
SCHED = sk.Schedule(period=300, max_ttl=600, leeway=30)


# -- schedule ---------------------------------------------------------------------------

@pytest.mark.parametrize(("period", "max_ttl", "leeway", "rotate", "use", "exp"), [
    (300, 600, 30, 150, 300, 930),
    (1, 5, 0, 1, 1, 6),          # rotation never at age 0
    (600, 3600, 30, 300, 600, 4230),
])
def test_schedule(period: int, max_ttl: int, leeway: int, rotate: int, use: int, exp: int) -> None:
    s = sk.Schedule(period=period, max_ttl=max_ttl, leeway=leeway)
    assert (s.rotate_at(T0) - T0, s.use_until(T0) - T0, s.expires_at(T0) - T0) == (rotate, use, exp)
    # The last token the key may sign still expires before the certification.
    assert s.use_until(T0) + max_ttl + leeway <= s.expires_at(T0)


@pytest.mark.parametrize("bad", [dict(period=0, max_ttl=1), dict(period=1, max_ttl=0),
                                 dict(period=1, max_ttl=1, leeway=-1)])
def test_schedule_rejects_nonsense(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        sk.Schedule(**bad)


# -- certification (daemon side) ----------------------------------------------------------

def _cert(hw: ec.EllipticCurvePrivateKey, session: ec.EllipticCurvePublicKey, *,
          subject: str = SUB, created: int = T0, typ: str | None = None,
          claims_patch: dict[str, Any] | None = None) -> str:
    claims = sk.certification_claims(issuer=ISS, subject=subject, session_key=session,
                                     created=created, schedule=SCHED)
    claims.update(claims_patch or {})
    hw_kid = jwk_thumbprint(ec_public_jwk(hw.public_key()))
    if typ is None:
        return sk.mint_certification(claims, hardware_kid=hw_kid,
                                     sign_der=lambda d: hw.sign(d, sk.ES256))
    from badged.core.jose import encode_jws

    return encode_jws({"alg": "ES256", "kid": hw_kid, "typ": typ}, claims,
                      lambda d: hw.sign(d, sk.ES256))


def _tamper_payload(cert: str, **changes: Any) -> str:
    h, p, s = cert.split(".")
    claims = json.loads(b64url_decode(p))
    claims.update(changes)
    return f"{h}.{b64url(canonical_json(claims))}.{s}"


HW = ec.generate_private_key(ec.SECP256R1())
OTHER_HW = ec.generate_private_key(ec.SECP256R1())
SESSION = ec.generate_private_key(ec.SECP256R1())
SESSION_JWK = ec_public_jwk(SESSION.public_key())
OTHER_SESSION = ec.generate_private_key(ec.SECP256R1())


def test_certification_verifies_and_says_what_it_certifies() -> None:
    cert = _cert(HW, SESSION.public_key())
    got = sk.verify_certification(cert, hardware_key=HW.public_key(), session_jwk=SESSION_JWK,
                                  now=T0 + 10, expected_subject=SUB)
    assert (got.subject, got.issuer, got.session_kid) == (SUB, ISS, jwk_thumbprint(SESSION_JWK))
    assert (got.not_before, got.use_until, got.expires_at) == (T0, T0 + 300, T0 + 930)


@pytest.mark.parametrize(("case", "reason"), [
    ("wrong hardware key", "wrong_key"),
    ("signed by another key, kid forged", "wrong_key"),
    ("expired", "expired"),
    ("not yet valid", "not_yet_valid"),
    ("tampered jwk", "jwk_mismatch"),
    ("tampered payload, signature kept", "wrong_key"),
    ("cert for another agent", "wrong_subject"),
    ("certifies another session key", "jwk_mismatch"),
    ("a token, not a certification", "wrong_type"),
    ("not a JWS", "malformed"),
    ("window inverted", "malformed"),
])
def test_certification_rejects(case: str, reason: str) -> None:
    hw_key, now, subject, jwk = HW.public_key(), float(T0 + 10), SUB, SESSION_JWK
    cert = _cert(HW, SESSION.public_key())
    if case == "wrong hardware key":
        hw_key = OTHER_HW.public_key()
    elif case == "signed by another key, kid forged":
        h, p, _ = cert.split(".")
        forged = _cert(OTHER_HW, SESSION.public_key())
        cert = f"{h}.{p}.{forged.split('.')[2]}"
    elif case == "expired":
        now = SCHED.expires_at(T0) + 30  # at exp + leeway
    elif case == "not yet valid":
        now = T0 - 31
    elif case == "tampered jwk":
        jwk = {**SESSION_JWK, "x": ec_public_jwk(OTHER_SESSION.public_key())["x"]}
    elif case == "tampered payload, signature kept":
        cert = _tamper_payload(cert, cnf={"jwk": ec_public_jwk(OTHER_SESSION.public_key())})
        jwk = ec_public_jwk(OTHER_SESSION.public_key())
    elif case == "cert for another agent":
        subject = "spiffe://example.org/agent/other"
    elif case == "certifies another session key":
        cert = _cert(HW, OTHER_SESSION.public_key())
    elif case == "a token, not a certification":
        cert = _cert(HW, SESSION.public_key(), typ="JWT")
    elif case == "not a JWS":
        cert = "a.b"
    elif case == "window inverted":
        cert = _cert(HW, SESSION.public_key(), claims_patch={"use_until": T0 + 10_000})
    with pytest.raises(sk.CertificationError) as err:
        sk.verify_certification(cert, hardware_key=hw_key, session_jwk=jwk, now=now,
                                expected_subject=subject)
    assert err.value.reason == reason


# -- the relying party's chain check (badgeclient.session_verify) -------------------------

class _SoftKey:
    """A KeyHandle over a software key, to mint test tokens with the real minter."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    @property
    def name(self) -> str:
        return "soft"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        return self._key.sign(data, signature_algorithm)


def _entry(key: ec.EllipticCurvePrivateKey, cert: str | None = None) -> dict[str, str]:
    jwk = ec_public_jwk(key.public_key())
    e = {**jwk, "kid": jwk_thumbprint(jwk), "use": "sig", "alg": "ES256"}
    if cert is not None:
        e[sk.JWKS_MEMBER] = cert
    return e


def _token(key: ec.EllipticCurvePrivateKey, *, iat: int = T0 + 5, ttl: int = 300,
           subject: str = SUB, extra: dict[str, Any] | None = None) -> str:
    claims = build_claims(issuer=ISS, subject=subject, audience="demo", scopes=["read"],
                          ttl_seconds=ttl, now=iat, jti="j1", extra=extra)
    kid = jwk_thumbprint(ec_public_jwk(key.public_key()))
    return mint_token(claims=claims, key=_SoftKey(key), key_id=kid).token


def _jwks(*entries: dict[str, str]) -> dict[str, Any]:
    return {"keys": list(entries)}


def test_chain_verifies_from_jwks_and_from_pinned_key() -> None:
    cert = _cert(HW, SESSION.public_key())
    jwks = _jwks(_entry(HW), _entry(SESSION, cert))
    token = _token(SESSION)
    got = verify_session_chain(token, jwks, now=T0 + 10)
    assert (got.agent, got.hardware_kid) == (SUB, _entry(HW)["kid"])
    pinned = {_entry(HW)["kid"]: HW.public_key()}
    assert verify_session_chain(token, _jwks(_entry(SESSION, cert)), now=T0 + 10,
                                hardware_keys=pinned).session_kid == _entry(SESSION)["kid"]
    # Delegated tokens: the agent is act.sub, the subject is the user.
    delegated = _token(SESSION, subject="spiffe://example.org/user/alice", extra={"act": {"sub": SUB}})
    assert verify_session_chain(delegated, jwks, now=T0 + 10).agent == SUB


@pytest.mark.parametrize(("case", "reason"), [
    ("kid not in JWKS", "unknown_kid"),
    ("direct-mode key", "not_session_key"),
    ("hardware key not pinned", "untrusted_hardware_key"),
    ("hardware key missing from JWKS", "untrusted_hardware_key"),
    ("certification from another hardware key", "bad_certification"),
    ("certification of another session key", "jwk_mismatch"),
    ("token signed by another key", "bad_signature"),
    ("token for another agent", "wrong_agent"),
    ("issued after use_until", "outside_window"),
    ("outlives the certification", "outside_window"),
    ("issued before nbf", "outside_window"),
    ("token expired", "expired"),
    ("certification expired", "expired"),
    ("certification typ is JWT", "bad_certification"),
    ("alg none", "malformed"),
])
def test_chain_rejects(case: str, reason: str) -> None:
    cert = _cert(HW, SESSION.public_key())
    hw_entry, session_entry = _entry(HW), _entry(SESSION, cert)
    token, now = _token(SESSION), float(T0 + 10)
    pinned: dict[str, ec.EllipticCurvePublicKey] | None = None
    if case == "kid not in JWKS":
        session_entry["kid"] = "nope"
    elif case == "direct-mode key":
        token = _token(HW)
    elif case == "hardware key not pinned":
        pinned = {_entry(OTHER_HW)["kid"]: OTHER_HW.public_key()}
    elif case == "hardware key missing from JWKS":
        hw_entry = _entry(OTHER_HW)
    elif case == "certification from another hardware key":
        forged = _cert(OTHER_HW, SESSION.public_key())
        h = cert.split(".")[0]
        session_entry[sk.JWKS_MEMBER] = f"{h}.{'.'.join(forged.split('.')[1:])}"
    elif case == "certification of another session key":
        session_entry[sk.JWKS_MEMBER] = _cert(HW, OTHER_SESSION.public_key())
    elif case == "token signed by another key":
        h, p, _ = token.split(".")
        token = f"{h}.{p}.{_token(OTHER_SESSION).split('.')[2]}"
    elif case == "token for another agent":
        token = _token(SESSION, subject="spiffe://example.org/agent/other")
    elif case == "issued after use_until":
        token, now = _token(SESSION, iat=T0 + 301, ttl=60), float(T0 + 310)
    elif case == "outlives the certification":
        token = _token(SESSION, ttl=2000)
    elif case == "issued before nbf":
        token = _token(SESSION, iat=T0 - 1)
    elif case == "token expired":
        now = float(T0 + 5 + 300 + 30)
    elif case == "certification expired":
        token, now = _token(SESSION, iat=T0 + 300, ttl=600), float(SCHED.expires_at(T0) + 30)
    elif case == "certification typ is JWT":
        session_entry[sk.JWKS_MEMBER] = _cert(HW, SESSION.public_key(), typ="JWT")
    elif case == "alg none":
        h = b64url(canonical_json({"alg": "none", "kid": session_entry["kid"]}))
        token = f"{h}.{token.split('.')[1]}."
    with pytest.raises(SessionChainError) as err:
        verify_session_chain(token, _jwks(hw_entry, session_entry), now=now, hardware_keys=pinned)
    assert err.value.reason == reason


# -- the manager ---------------------------------------------------------------------------

class FlakyKeyStore(MemoryKeyStore):
    """A token that can be 'unplugged': signing then fails like a dead TPM."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.signs = 0

    def get(self, name: str) -> KeyHandle:
        inner = super().get(name)
        store = self

        class Handle:
            @property
            def name(self) -> str:
                return inner.name

            def public_key(self) -> ec.EllipticCurvePublicKey:
                return inner.public_key()

            def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
                if store.down:
                    raise KeyStoreUnavailableError("unplugged", backend="memory")
                store.signs += 1
                return inner.sign(data, signature_algorithm)

        return Handle()


class Scheduled:
    """Records what the manager asks the event loop to run later."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.callbacks: list[tuple[float, Any]] = []

    def __call__(self, delay: float, callback: Any) -> None:
        self.calls.append(delay)
        self.callbacks.append((delay, callback))


def _setup(tmp_path: Path, *, persist: bool = True) -> tuple[AgentRegistry, SessionKeyManager,
                                                               FlakyKeyStore, FixedClock, Scheduled]:
    clock = FixedClock(T0)
    store = FlakyKeyStore()
    reg = AgentRegistry(store=AgentStore(tmp_path / "agents.json"), keystore=store, clock=clock,
                        monotonic=clock, trust_domain="example.org", max_token_ttl=600)
    reg.create("bot")
    reg.create("other")
    sched = Scheduled()
    mgr = SessionKeyManager(reg, clock=clock, monotonic=clock, issuer=ISS, schedule=SCHED,
                            persist_path=tmp_path / "session-keys.json" if persist else None,
                            scheduler=sched)
    return reg, mgr, store, clock, sched


def _kids(mgr: SessionKeyManager) -> set[str]:
    return {k["kid"] for k in mgr.jwks()["keys"] if sk.JWKS_MEMBER in k}


def _verify(mgr: SessionKeyManager, token: str, now: float, reg: AgentRegistry) -> str:
    hw = {reg.get(a).current.token_kid: reg.token_key(a).handle.public_key() for a in ("bot",)}
    return verify_session_chain(token, mgr.jwks(), now=now, hardware_keys=hw).agent


def _mint(key: Any, now: float, ttl: int = 600) -> str:
    claims = build_claims(issuer=ISS, subject=key.spiffe_id, audience="demo", scopes=["read"],
                          ttl_seconds=ttl, now=now, jti=f"j{now}")
    return mint_token(claims=claims, key=key.handle, key_id=key.kid).token


def test_rotation_schedule(tmp_path: Path) -> None:
    reg, mgr, store, clock, sched = _setup(tmp_path)
    k1 = mgr.token_key("bot")
    assert store.signs == 1 and sched.calls == [300.0]  # the sweep at use_until
    assert k1.kid not in {reg.get("bot").current.token_kid}  # not the hardware key
    clock.advance(149)
    assert mgr.token_key("bot").kid == k1.kid and store.signs == 1  # no hardware use
    t1 = _mint(k1, clock())
    clock.advance(1)  # half-life: the next key is certified and published, not used yet
    assert mgr.token_key("bot").kid == k1.kid and store.signs == 2
    (k2_kid,) = _kids(mgr) - {k1.kid}
    assert mgr.active_private_keys() == 2
    clock.now = T0 + 299
    assert mgr.token_key("bot").kid == k1.kid and store.signs == 2
    clock.now = T0 + 300  # k1's use_until: k2 takes over, published 150 s ago
    k2 = mgr.token_key("bot")
    assert k2.kid == k2_kid
    assert k1.handle.sign(b"x", sk.ES256)  # an in-flight request may finish with it
    assert store.signs == 3  # k2 is at its half-life too: k3 is pre-published
    assert mgr.active_private_keys() == 2  # k2 and k3; the daemon dropped k1
    # The old key stays published until its last possible token has expired.
    assert _verify(mgr, t1, clock(), reg) == reg.spiffe_id("bot")
    clock.now = SCHED.expires_at(T0) - 1
    mgr.jwks()
    assert k1.kid in _kids(mgr)
    clock.now = SCHED.expires_at(T0)
    assert k1.kid not in _kids(mgr)


def test_every_token_verifies_until_it_expires(tmp_path: Path) -> None:
    """Tokens of max TTL minted over many rotations all chain until exp."""
    reg, mgr, _, clock, _ = _setup(tmp_path)
    minted: list[tuple[str, int]] = []
    for _ in range(40):
        key = mgr.token_key("bot")
        minted.append((_mint(key, clock(), ttl=600), int(clock()) + 600))
        clock.advance(37)
        for token, exp in minted:
            if clock() < exp:
                _verify(mgr, token, clock(), reg)
    assert len(_kids(mgr)) < 10  # bounded: old entries are unpublished


def test_hardware_down_at_rotation_keeps_current_key_then_fails_closed(tmp_path: Path) -> None:
    _, mgr, store, clock, _ = _setup(tmp_path)
    k1 = mgr.token_key("bot")
    store.down = True
    clock.advance(200)
    assert mgr.token_key("bot").kid == k1.kid  # rotation failed, current key still valid
    clock.advance(1)
    assert mgr.token_key("bot").kid == k1.kid  # retry throttled (5 s), no exception
    clock.now = T0 + 300  # use_until: nothing may sign any more
    with pytest.raises(KeyStoreUnavailableError):
        mgr.token_key("bot")
    assert mgr.active_private_keys() == 0
    store.down = False
    assert mgr.token_key("bot").kid != k1.kid  # recovers without a restart


def test_revocation_wipes_at_once(tmp_path: Path) -> None:
    reg, mgr, _, _, _ = _setup(tmp_path)
    bot, other = mgr.token_key("bot"), mgr.token_key("other")
    reg.revoke("bot", "test")
    with pytest.raises(FailedPreconditionError):
        bot.handle.sign(b"x", sk.ES256)  # even a handle already handed out
    with pytest.raises(FailedPreconditionError):
        mgr.token_key("bot")
    assert _kids(mgr) == {other.kid}
    assert bot.kid not in (tmp_path / "session-keys.json").read_text()
    assert other.handle.sign(b"x", sk.ES256)


def test_agent_rotation_recertifies_and_keeps_old_session_key_published(tmp_path: Path) -> None:
    reg, mgr, _, clock, _ = _setup(tmp_path)
    k1 = mgr.token_key("bot")
    t1 = _mint(k1, clock())
    reg.rotate("bot")
    assert mgr.active_private_keys() == 0
    k2 = mgr.token_key("bot")
    assert k2.kid != k1.kid and k2.version == 2
    assert _kids(mgr) == {k1.kid, k2.kid}
    # The old certification chains to the retired hardware key, still in the JWKS.
    assert verify_session_chain(t1, mgr.jwks(), now=clock()).agent == reg.spiffe_id("bot")


def test_restart_republishes_public_keys_only(tmp_path: Path) -> None:
    reg, mgr, _, clock, _ = _setup(tmp_path)
    k1 = mgr.token_key("bot")
    t1 = _mint(k1, clock())
    text = (tmp_path / "session-keys.json").read_text()
    assert "\"d\"" not in text and "PRIVATE" not in text
    clock.advance(60)
    mgr2 = SessionKeyManager(reg, clock=clock, monotonic=clock, issuer=ISS, schedule=SCHED,
                             persist_path=tmp_path / "session-keys.json")
    assert _kids(mgr2) == {k1.kid}
    assert _verify(mgr2, t1, clock(), reg) == reg.spiffe_id("bot")
    assert mgr2.token_key("bot").kid != k1.kid  # the private key did not survive


def test_corrupt_persisted_file_starts_empty(tmp_path: Path) -> None:
    reg, mgr, _, clock, _ = _setup(tmp_path)
    mgr.token_key("bot")
    (tmp_path / "session-keys.json").write_text("{not json")
    mgr2 = SessionKeyManager(reg, clock=clock, monotonic=clock, issuer=ISS, schedule=SCHED,
                             persist_path=tmp_path / "session-keys.json")
    assert _kids(mgr2) == set()


def test_sweep_drops_private_key_without_traffic(tmp_path: Path) -> None:
    _, mgr, _, clock, _ = _setup(tmp_path, persist=False)
    mgr.token_key("bot")
    clock.advance(299)
    mgr.sweep()
    assert mgr.active_private_keys() == 1
    clock.advance(1)
    mgr.sweep()
    assert mgr.active_private_keys() == 0


def test_sign_stays_on_the_hardware_key(tmp_path: Path) -> None:
    reg, mgr, _, _, _ = _setup(tmp_path)
    assert mgr.sign_key("bot").kid == reg.get("bot").current.sign_kid


def test_certifications_are_audited_before_use_and_audit_failure_fails_closed(tmp_path: Path) -> None:
    clock = FixedClock(T0)
    reg = AgentRegistry(store=AgentStore(tmp_path / "agents.json"), keystore=MemoryKeyStore(),
                        clock=clock, monotonic=clock, trust_domain="example.org", max_token_ttl=600)
    reg.create("bot")
    events: list[dict[str, Any]] = []
    broken = [False]

    def audit(event: dict[str, Any]) -> None:
        if broken[0]:
            raise OSError("disk full")
        events.append(event)

    mgr = SessionKeyManager(reg, clock=clock, monotonic=clock, issuer=ISS, schedule=SCHED, audit=audit)
    key = mgr.token_key("bot")
    assert [(e["event"], e["kid"], e["hardware_kid"]) for e in events] == [
        ("session_key.certified", key.kid, reg.get("bot").current.token_kid)]
    assert events[0]["exp"] == SCHED.expires_at(T0)
    assert "cert" not in events[0] and "d" not in events[0]  # a hash, never key material
    broken[0] = True
    clock.now = T0 + 300  # must rotate, and cannot audit: no key is used
    with pytest.raises(OSError):
        mgr.token_key("bot")
    assert mgr.active_private_keys() == 0 and _kids(mgr) == {key.kid}


def _with_background(tmp_path: Path) -> tuple[AgentRegistry, SessionKeyManager, FlakyKeyStore,
                                              FixedClock, Scheduled, list[Any]]:
    clock = FixedClock(T0)
    store = FlakyKeyStore()
    reg = AgentRegistry(store=AgentStore(tmp_path / "agents.json"), keystore=store, clock=clock,
                        monotonic=clock, trust_domain="example.org", max_token_ttl=600)
    reg.create("bot")
    sched = Scheduled()
    jobs: list[Any] = []
    mgr = SessionKeyManager(reg, clock=clock, monotonic=clock, issuer=ISS, schedule=SCHED, scheduler=sched,
                            background=jobs.append)
    return reg, mgr, store, clock, sched, jobs


def _fire(sched: Scheduled, delay: float) -> None:
    for d, cb in list(sched.callbacks):
        if d == delay:
            cb()


def test_background_rotation_at_half_life_only_for_used_keys(tmp_path: Path) -> None:
    _, mgr, store, clock, sched, jobs = _with_background(tmp_path)
    k1 = mgr.token_key("bot")
    assert sorted(sched.calls) == [151.0, 300.0]  # rotation (+1 s margin), then the sweep
    clock.now = T0 + 151
    _fire(sched, 151.0)
    assert len(jobs) == 1
    jobs.pop()()  # what the executor thread runs
    assert store.signs == 2
    (k2_kid,) = _kids(mgr) - {k1.kid}  # published before anyone uses it
    assert mgr.token_key("bot").kid == k1.kid  # k1 signs until its use_until
    clock.now = T0 + 300
    assert mgr.token_key("bot").kid == k2_kid and store.signs == 2  # no hardware on requests
    # No request after this one: at k2's half-life the agent is idle, nothing is made.
    clock.now = T0 + 302
    _fire(sched, 151.0)
    for job in jobs:
        job()
    jobs.clear()
    assert store.signs == 3  # the check right after the switch saw the last request...
    clock.now = T0 + 453
    _fire(sched, 151.0)
    for job in jobs:
        job()
    assert store.signs == 3  # ...and then none: idle agents cost no hardware signature


def test_background_rotation_of_a_revoked_agent_does_nothing(tmp_path: Path) -> None:
    reg, mgr, store, clock, sched, jobs = _with_background(tmp_path)
    mgr.token_key("bot")
    reg.revoke("bot", "test")
    clock.now = T0 + 150
    _fire(sched, 150.0)
    for job in jobs:
        job()
    assert store.signs == 1 and mgr.active_private_keys() == 0


def test_requests_never_wait_for_a_certification_under_way(tmp_path: Path) -> None:
    _, mgr, store, clock, _, _ = _with_background(tmp_path)
    k1 = mgr.token_key("bot")
    clock.now = T0 + 200  # past half-life, a certification is running elsewhere
    assert mgr._mint_lock.acquire()
    try:
        assert mgr.token_key("bot").kid == k1.kid  # served at once with the current key
    finally:
        mgr._mint_lock.release()
    assert store.signs == 1
    assert mgr.token_key("bot").kid == k1.kid  # the request after it certifies the next key
    assert store.signs == 2 and len(_kids(mgr)) == 2

def test_a_published_certification_never_passes_as_an_access_token(tmp_path: Path) -> None:
    """Certifications sit in the public JWKS, signed by a key trusted for
    tokens: replaying one as a bearer token must fail at any sane relying party."""
    from joserfc import jwt
    from joserfc.errors import JoseError
    from joserfc.jwk import KeySet

    from badgeclient.verify import VerificationError, Verifier

    reg, mgr, _, clock, _ = _setup(tmp_path)
    mgr.token_key("bot")
    jwks = mgr.jwks()
    cert = next(k[sk.JWKS_MEMBER] for k in jwks["keys"] if sk.JWKS_MEMBER in k)
    decoded = jwt.decode(cert, KeySet.import_key_set(jwks), algorithms=["ES256"])  # type: ignore[arg-type]
    assert "sub" not in decoded.claims and "aud" not in decoded.claims  # signature alone is fine...
    with pytest.raises(JoseError):  # ...but no audience: refused
        jwt.JWTClaimsRegistry(now=int(clock()), aud={"essential": True, "value": "demo"}).validate(
            decoded.claims)
    with pytest.raises(VerificationError):
        Verifier(jwks=jwks, clock=clock).verify_token(cert, audience="demo")
    # And a "certification" carrying token claims is not a certification.
    hw = reg.token_key("bot")
    forged = sk.mint_certification(
        {**json.loads(b64url_decode(cert.split(".")[1])), "sub": SUB, "aud": "demo"},
        hardware_kid=hw.kid, sign_der=lambda d: hw.handle.sign(d, sk.ES256))
    entry = next(k for k in jwks["keys"] if sk.JWKS_MEMBER in k)
    entry[sk.JWKS_MEMBER] = forged
    token = _mint(mgr.token_key("bot"), clock())
    with pytest.raises(SessionChainError) as err:
        verify_session_chain(token, jwks, now=clock())
    assert err.value.reason == "bad_certification"


def test_edited_persisted_file_cannot_publish_a_foreign_key(tmp_path: Path) -> None:
    reg, mgr, _, clock, _ = _setup(tmp_path)
    genuine = mgr.token_key("bot")
    path = tmp_path / "session-keys.json"
    doc = json.loads(path.read_text())
    # An attacker's key with a "certification" from their own key, and the
    # genuine entry with a longer window written into the file.
    foreign = ec.generate_private_key(ec.SECP256R1())
    fjwk = ec_public_jwk(foreign.public_key())
    fake = dict(doc["keys"][0], kid=jwk_thumbprint(fjwk), jwk=fjwk,
                cert=_cert(OTHER_HW, foreign.public_key(), subject=reg.spiffe_id("bot")))
    doc["keys"][0]["expires_at"] += 10**6
    doc["keys"].append(fake)
    path.write_text(json.dumps(doc))
    mgr2 = SessionKeyManager(reg, clock=clock, monotonic=clock, issuer=ISS, schedule=SCHED, persist_path=path)
    assert _kids(mgr2) == {genuine.kid}
    clock.now = SCHED.expires_at(T0)  # the certification's exp wins over the file's
    assert _kids(mgr2) == set()


def test_direct_mode_after_session_mode_keeps_live_session_keys_published(tmp_path: Path) -> None:
    reg, mgr, _, clock, _ = _setup(tmp_path)
    old = mgr.token_key("bot")
    token = _mint(old, clock())
    direct = SessionKeyManager(reg, clock=clock, monotonic=clock, issuer=ISS, schedule=SCHED,
                               persist_path=tmp_path / "session-keys.json", signing=False)
    assert direct.publishes_any
    key = direct.token_key("bot")
    assert key.kid == reg.get("bot").current.token_kid  # the hardware key signs again
    assert old.kid in _kids(direct)
    assert _verify(direct, token, clock(), reg) == reg.spiffe_id("bot")
    assert direct.active_private_keys() == 0
