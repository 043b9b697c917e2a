"""Session-key mode: tokens signed by short-lived in-memory keys the hardware certified.

Why: a real TPM signs about 5 times a second (FINDINGS §3). In session mode
the agent's hardware token key signs one certification per agent every
``period/2`` seconds (docs/tpm.md, "Session-key mode") and a P-256 key held
only in this process signs the tokens, at OpenSSL speed.

:class:`SessionKeyManager` offers the same ``token_key(name)`` / ``jwks()``
pair as :class:`~badged.identity.registry.AgentRegistry`, so the workload
service does not know which mode it runs in. Lifecycle of one session key
(times from :class:`~badged.core.session_keys.Schedule`):

* made on the first token request for the agent: generated with
  ``ec.generate_private_key`` (never serialized, never written anywhere),
  certified by the hardware key, its *public* entry persisted, then used;
* at ``rotate_at`` (half the period) the *next* key is certified in the
  background (executor thread) if the agent had requests in the last half
  period, and published at once; the current key keeps signing until its
  ``use_until``, then the next one takes over without touching the hardware.
  So every key is in the JWKS half a period before it signs anything
  (relying parties that refresh their JWKS that often never see an unknown
  ``kid``), no request waits for the hardware, and idle agents cost nothing.
  Requests after ``rotate_at`` also try to make the next key, but never wait
  for a certification already running. If the hardware fails, the current
  key keeps signing until ``use_until`` and requests retry every
  ``retry_seconds``; only a key past ``use_until`` with no next key and a
  dead TPM fails the request (UNAVAILABLE);
* at ``use_until``, or when the agent's hardware key rotates, the private
  key is dropped (a timer does it even with no traffic), while the public key
  and its certification stay in the JWKS until ``exp``, after the last token
  it signed has expired;
* on revocation everything of the agent goes at once: private keys are
  wiped (a handle still held by an in-flight request refuses to sign) and the
  JWKS entries disappear.

Public entries are kept in ``private/session-keys.json`` (public keys and
certifications only) so a daemon restart does not unpublish keys whose
tokens are still valid.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from badged.core.clock import Clock, Monotonic, monotonic_clock
from badged.core.jose import ec_public_jwk, jwk_thumbprint
from badged.core.session_keys import (
    ES256,
    JWKS_MEMBER,
    CertificationError,
    Schedule,
    certification_claims,
    mint_certification,
    public_key_from_jwk,
    verify_certification,
)
from badged.core.tokens import JWK_AGENT_MEMBER
from badged.errors import FailedPreconditionError, KeyStoreError, KeyStoreUnavailableError
from badged.fsutil import atomic_write
from badged.identity.registry import AgentRegistry, SigningKey

_logger = logging.getLogger(__name__)

Scheduler = Callable[[float, Callable[[], None]], object]
"""``schedule(delay_seconds, callback)``, e.g. ``loop.call_later``."""

Background = Callable[[Callable[[], None]], object]
"""Runs a callable off the event loop, e.g. ``loop.run_in_executor(None, fn)``."""

AuditHook = Callable[[dict[str, Any]], object]
"""Makes one audit event durable before returning (``AuditLog.append_sync``)."""


class SessionKeyHandle:
    """A :class:`~badged.keystore.port.KeyHandle` over an in-memory private key.

    ``wipe()`` removes the only reference the daemon keeps; once wiped the
    handle refuses to sign, so a request racing a revocation cannot use it.
    """

    def __init__(self, name: str, private: ec.EllipticCurvePrivateKey) -> None:
        self._name = name
        self._private: ec.EllipticCurvePrivateKey | None = private
        self._public = private.public_key()

    @property
    def name(self) -> str:
        return self._name

    @property
    def wiped(self) -> bool:
        return self._private is None

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        private = self._private
        if private is None:
            raise FailedPreconditionError(f"session key {self._name} was wiped")
        return private.sign(data, signature_algorithm)

    def wipe(self) -> None:
        # OpenSSL clears the scalar when the key is freed (BN_clear_free);
        # Python cannot do better than dropping the last reference.
        self._private = None


@dataclass
class _Published:
    """One session key as relying parties see it (public only)."""

    agent: str
    kid: str
    jwk: dict[str, str]
    cert: str
    hw_version: int
    created_at: int
    use_until: int
    rotate_at: int
    expires_at: int
    handle: SessionKeyHandle | None = field(default=None, repr=False)
    # ``expires_at`` placed on the monotonic clock when the key was published
    # (or loaded); never persisted. The entry is unpublished only once both
    # have passed, so a forward wall-clock step cannot cut it short.
    mono_expires: float = field(default=0.0, repr=False)
    # ``use_until`` on the monotonic clock: what the sweep timer counts down.
    mono_use_until: float = field(default=0.0, repr=False)

    def live(self, now: float, mono: float) -> bool:
        return self.expires_at > now or self.mono_expires > mono

    def entry(self) -> dict[str, str]:
        return {**self.jwk, "kid": self.kid, "use": "sig", "alg": "ES256", JWKS_MEMBER: self.cert}

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.agent, "kid": self.kid, "jwk": self.jwk, "cert": self.cert,
                "hw_version": self.hw_version, "created_at": self.created_at,
                "use_until": self.use_until, "rotate_at": self.rotate_at,
                "expires_at": self.expires_at}


class SessionKeyManager:
    """Hands out session keys per agent; same ``token_key``/``jwks`` as the registry.

    Thread-safe. Locks: ``_mint_lock`` serializes certifications (one hardware
    sign at a time) and may be held while calling the registry; ``_lock``
    guards the tables and is never held while calling the registry, whose
    listener takes it -- so the two can never wait for each other.
    """

    def __init__(self, registry: AgentRegistry, *, clock: Clock, issuer: str, schedule: Schedule,
                 persist_path: Path | None = None, scheduler: Scheduler | None = None,
                 audit: AuditHook | None = None,
                 background: Background | None = None,
                 retry_seconds: float = 5.0, signing: bool = True,
                 monotonic: Monotonic = monotonic_clock) -> None:
        self._registry = registry
        self._clock = clock
        self._mono = monotonic
        self._issuer = issuer
        self._schedule = schedule
        self._persist_path = persist_path
        self._scheduler = scheduler
        self._audit = audit
        self._background = background
        self._signing = signing
        self._retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._mint_lock = threading.Lock()
        self._current: dict[str, _Published] = {}
        self._next: dict[str, _Published] = {}  # certified and published, not yet signing
        self._used: set[str] = set()  # agents with requests since the last background check
        self._published: dict[str, builtins.list[_Published]] = {}
        self._generation: dict[str, int] = {}
        self._retry_after: dict[str, float] = {}
        self.certifications = 0  # hardware signs made: for tests and the bench
        self._sweep_timer: object | None = None
        self._load()
        registry.add_listener(self._on_agent_change)

    @property
    def publishes_any(self) -> bool:
        """Whether any session key is still published (after a switch to direct mode)."""
        with self._lock:
            return bool(self._published)

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    # -- the registry-compatible surface ----------------------------------------------

    def token_key(self, name: str) -> SigningKey:
        if not self._signing:
            return self._registry.token_key(name)
        rec = self._registry.active(name)  # FailedPreconditionError once revoked
        version, now = rec.current.version, self._clock()
        with self._lock:
            self._used.add(name)
            cur = self._promote(name, version, now)
            want_next = (cur is not None and now >= cur.rotate_at and name not in self._next
                         and now >= self._retry_after.get(name, 0.0))
        if cur is None:
            cur = self._make(name, blocking=True)
        elif want_next:
            try:
                # Never wait here for a certification already running (in the
                # background or another request): the current key is fine.
                self._make(name, blocking=False)
            except KeyStoreError as exc:
                # The current key is still good until use_until: keep serving.
                with self._lock:
                    self._retry_after[name] = now + self._retry_seconds
                _logger.warning("next session key not certified; current key still valid",
                                extra={"agent": name, "error": str(exc),
                                       "use_until": cur.use_until})
        handle = cur.handle if cur is not None else None
        if cur is None or handle is None:  # retired meanwhile: rotated or revoked just now
            raise KeyStoreUnavailableError(f"session key of {name} was retired during the request")
        return SigningKey(name, rec.spiffe_id, cur.kid, handle, cur.hw_version)

    def sign_key(self, name: str) -> SigningKey:
        """``Sign`` stays on the hardware key: its output is not a JWT a JWKS covers."""
        return self._registry.sign_key(name)

    def jwks(self) -> dict[str, builtins.list[dict[str, str]]]:
        """The hardware keys (which verify certifications and client assertions)
        plus every session key whose certification has not expired."""
        keys = list(self._registry.jwks()["keys"])
        active = {a.name for a in self._registry.list()}
        with self._lock:
            self._expire()
            for agent in sorted(self._published):
                if agent in active:  # each key names its agent, as in the registry
                    spiffe_id = self._registry.spiffe_id(agent)
                    keys.extend({**p.entry(), JWK_AGENT_MEMBER: spiffe_id}
                                for p in self._published[agent])
        return {"keys": keys}

    def sweep(self) -> None:
        """Drop private keys past ``use_until`` and unpublish expired ones."""
        now = self._clock()
        with self._lock:
            mono = self._mono()
            for p in [*self._current.values(), *self._next.values()]:
                # Whichever clock says first: a wall step forward ends signing
                # early (use_until is a claim), a step back cannot stretch it.
                if now >= p.use_until or mono >= p.mono_use_until:
                    self._retire(p)
            self._expire()
        self._arm_sweep()

    def _arm_sweep(self) -> None:
        """One timer, for the earliest ``use_until`` of a held key on the
        monotonic clock, re-armed by every sweep (issue 15: a timer computed
        from the wall clock fired early after a step back and was never
        re-armed). A wall step forward ends a key's signing early, since
        ``use_until`` is a claim: the daemon sweeps as soon as it sees the
        step (badged.app)."""
        if self._scheduler is None:
            return
        with self._lock:
            ends = [p.mono_use_until for p in (*self._current.values(), *self._next.values())
                    if p.handle is not None]
            old, self._sweep_timer = self._sweep_timer, None
            if ends:
                delay = max(0.0, min(ends) - self._mono())
                self._sweep_timer = self._scheduler(delay, self.sweep)
        cancel = getattr(old, "cancel", None)
        if callable(cancel):
            cancel()

    def active_private_keys(self) -> int:
        """How many private session keys the daemon holds now (tests, metrics)."""
        with self._lock:
            return sum(1 for p in [*self._current.values(), *self._next.values()]
                       if p.handle is not None)

    # -- making a key ----------------------------------------------------------------

    def _make(self, name: str, *, blocking: bool) -> _Published | None:
        """Make sure ``name`` has a current key and, from ``rotate_at`` on, a
        next one; return the current key. None if not ``blocking`` and a
        certification is already under way."""
        if not self._mint_lock.acquire(blocking=blocking):
            return None
        try:
            return self._make_locked(name)
        finally:
            self._mint_lock.release()

    def _rotate_in_background(self, name: str) -> None:
        """At ``rotate_at``, off the request path: the next key is certified
        and published before it is needed, so no request waits for the
        hardware (~200 ms on a real TPM). Only agents with requests since the
        last check get one: idle agents cost nothing."""
        with self._lock:
            if name not in self._used:
                return
            self._used.discard(name)
        try:
            self._make(name, blocking=True)
        except Exception as exc:  # runs in an executor: log, the request path retries
            _logger.warning("background session key rotation failed",
                            extra={"agent": name, "error": str(exc)})

    def _make_locked(self, name: str) -> _Published:
        version = self._registry.active(name).current.version
        with self._lock:
            generation = self._generation.get(name, 0)
            now, mono = self._clock(), self._mono()
            cur = self._promote(name, version, now)
            if cur is not None and (now < cur.rotate_at or name in self._next):
                return cur  # nothing to do, or done by someone else meanwhile
        hw = self._registry.token_key(name)  # raises if revoked meanwhile
        created = int(now)
        private = ec.generate_private_key(ec.SECP256R1())
        public = private.public_key()
        jwk = ec_public_jwk(public)
        kid = jwk_thumbprint(jwk)
        claims = certification_claims(issuer=self._issuer, subject=hw.spiffe_id,
                                      session_key=public, created=created,
                                      schedule=self._schedule)
        cert = mint_certification(claims, hardware_kid=hw.kid,
                                  sign_der=lambda data: hw.handle.sign(data, ES256))
        try:
            # Catches a backend that returns garbage: one verify per rotation.
            verify_certification(cert, hardware_key=hw.handle.public_key(), session_jwk=jwk,
                                 now=now, expected_subject=hw.spiffe_id,
                                 expected_hardware_kid=hw.kid, leeway=0)
        except CertificationError as exc:
            raise KeyStoreError(f"certification by {hw.kid} does not verify: {exc}") from None
        self.certifications += 1
        if self._audit is not None:
            # Durable before the key signs anything, so every token.issued
            # record's kid resolves to a hardware key in the same log.
            self._audit({"event": "session_key.certified", "agent": name, "kid": kid,
                         "hardware_kid": hw.kid, "version": hw.version,
                         "use_until": self._schedule.use_until(created),
                         "exp": self._schedule.expires_at(created),
                         "credential_sha256": hashlib.sha256(cert.encode()).hexdigest()})
        new = _Published(
            agent=name, kid=kid, jwk=jwk, cert=cert, hw_version=hw.version,
            created_at=created, use_until=self._schedule.use_until(created),
            rotate_at=self._schedule.rotate_at(created),
            expires_at=self._schedule.expires_at(created),
            handle=SessionKeyHandle(f"session/{name}/{kid[:16]}", private))
        new.mono_expires = mono + (new.expires_at - now)
        new.mono_use_until = mono + (new.use_until - now)
        # Published (durably) before any request can pick the key up.
        with self._lock:
            self._check_generation(name, generation)
            self._expire()
            snapshot = self._snapshot(also=new)
        self._persist(snapshot)
        with self._lock:
            self._check_generation(name, generation)
            cur = self._promote(name, version, now)
            if cur is not None:  # still signing: the new key waits, published
                old_next = self._next.pop(name, None)
                if old_next is not None:
                    self._retire(old_next)
                self._next[name] = new
                result = cur
            else:
                self._current[name] = new
                result = new
            self._published.setdefault(name, []).append(new)
            self._retry_after.pop(name, None)
        if self._scheduler is not None:
            self._arm_sweep()
            if self._background is not None:
                background = self._background

                def rotate_later() -> None:
                    background(lambda: self._rotate_in_background(name))

                # A timer may fire a little early; it must find rotate_at passed.
                margin = min(1.0, (new.use_until - new.rotate_at) / 4)
                self._scheduler(max(0.0, new.rotate_at - now) + margin, rotate_later)
        _logger.info("session key certified", extra={"agent": name, "kid": kid,
                                                     "hardware_kid": hw.kid,
                                                     "use_until": new.use_until,
                                                     "exp": new.expires_at,
                                                     "role": "current" if result is new else "next"})
        return result

    # -- lifecycle (lock held) -------------------------------------------------------

    def _retire(self, p: _Published) -> None:
        """Stop signing with ``p``; its public entry stays until it expires."""
        p.handle = None  # in-flight requests keep their own reference for milliseconds
        for table in (self._current, self._next):
            if table.get(p.agent) is p:
                del table[p.agent]

    def _promote(self, name: str, version: int, now: float) -> _Published | None:
        """The key that signs for ``name`` now, if any: the current one while it
        is usable, else the next one, which takes over without the hardware."""
        cur = self._current.get(name)
        if cur is not None and self._usable(cur, version, now):
            return cur
        if cur is not None:
            self._retire(cur)
        nxt = self._next.pop(name, None)
        if nxt is not None and self._usable(nxt, version, now):
            self._current[name] = nxt
            return nxt
        if nxt is not None:
            self._retire(nxt)
        return None

    @staticmethod
    def _usable(p: _Published, version: int, now: float) -> bool:
        return p.handle is not None and p.hw_version == version and now < p.use_until

    def _expire(self) -> None:
        """Unpublish entries whose wall *and* monotonic expiry have passed."""
        now, mono = self._clock(), self._mono()
        for agent in list(self._published):
            keep = [p for p in self._published[agent] if p.live(now, mono)]
            if keep:
                self._published[agent] = keep
            else:
                del self._published[agent]

    def _on_agent_change(self, name: str, event: str) -> None:
        """Registry listener: hardware key rotated or agent revoked."""
        with self._lock:
            self._generation[name] = self._generation.get(name, 0) + 1
            held = [p for p in (self._current.pop(name, None), self._next.pop(name, None))
                    if p is not None]
            self._used.discard(name)
            if event == "revoked":
                for p in [*self._published.pop(name, []), *held]:
                    if p.handle is not None:
                        p.handle.wipe()
                    p.handle = None
            else:
                for p in held:
                    self._retire(p)
            snapshot = self._snapshot()
        self._persist(snapshot)
        _logger.info("session keys dropped", extra={"agent": name, "event": event})

    # -- persistence of the public half ------------------------------------------------

    def _check_generation(self, name: str, generation: int) -> None:
        if self._generation.get(name, 0) != generation:
            # Revoked or rotated while we signed: the new key is never used.
            raise KeyStoreUnavailableError(f"agent {name} changed during certification")

    def _snapshot(self, also: _Published | None = None) -> bytes:
        entries = [p.to_json() for agent in sorted(self._published) for p in self._published[agent]]
        if also is not None:
            entries.append(also.to_json())
        return json.dumps({"version": 1, "keys": entries}, sort_keys=True).encode()

    def _persist(self, snapshot: bytes) -> None:
        if self._persist_path is not None:
            atomic_write(self._persist_path, snapshot, mode=0o600)

    def _genuine(self, p: _Published, now: float) -> bool:
        """Republish only what the agent's hardware key really certified, with
        the window the certification itself states (not the file's copy):
        an edited file must not put a foreign key into the JWKS."""
        rec = self._registry.get(p.agent)
        version = next((v for v in rec.versions if v.version == p.hw_version), None)
        if version is None or jwk_thumbprint(p.jwk) != p.kid:
            return False
        try:
            cert = verify_certification(
                p.cert, hardware_key=public_key_from_jwk(version.token_jwk), session_jwk=p.jwk,
                now=now, expected_subject=rec.spiffe_id, expected_hardware_kid=version.token_kid,
                leeway=0)
        except CertificationError as exc:
            _logger.warning("dropping a published session key that does not verify",
                            extra={"agent": p.agent, "kid": p.kid, "reason": exc.reason})
            return False
        p.use_until, p.expires_at = cert.use_until, cert.expires_at
        # After a restart only the wall time carries over: the remaining
        # publication goes on the monotonic clock as of now (as grants do).
        p.mono_expires = self._mono() + (cert.expires_at - now)
        return cert.expires_at > now

    def _load(self) -> None:
        """Republish still-valid public entries after a restart; never a private key."""
        if self._persist_path is None or not self._persist_path.exists():
            return
        now = self._clock()
        try:
            doc = json.loads(self._persist_path.read_text())
            entries = doc["keys"]
            active = {a.name for a in self._registry.list()}
            for e in entries:
                p = _Published(agent=str(e["agent"]), kid=str(e["kid"]),
                               jwk={k: str(v) for k, v in e["jwk"].items()}, cert=str(e["cert"]),
                               hw_version=int(e["hw_version"]), created_at=int(e["created_at"]),
                               use_until=int(e["use_until"]), rotate_at=int(e["rotate_at"]),
                               expires_at=int(e["expires_at"]))
                if p.agent in active and self._genuine(p, now):
                    self._published.setdefault(p.agent, []).append(p)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Public data only: losing it unpublishes keys early (relying
            # parties then refuse some live tokens), it cannot grant anything.
            _logger.error("cannot read published session keys; starting without them",
                          extra={"path": str(self._persist_path), "error": str(exc)})
            self._published.clear()
