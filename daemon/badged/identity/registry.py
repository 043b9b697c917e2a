"""Agent identities: lifecycle (create, rotate, revoke) over the key store.

Every agent has two keys per version, both generated inside the token:

* the *token key* signs access tokens and is published in the JWKS;
* the *sign key* serves ``Sign`` over caller data and is never in the JWKS.

Ordering makes crashes safe: metadata is written *before* keys are destroyed
(revoke, rotate), and *after* keys are created (create, rotate). A crash can
therefore leave only orphan or doomed keys, which :meth:`reconcile` sweeps at
start -- never a published identity without its key, nor a revoked one that
can still sign.
"""

from __future__ import annotations

import builtins
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from badged.core.clock import Clock
from badged.core.jose import ec_public_jwk, jwk_thumbprint
from badged.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidRequestError,
    KeyExistsError,
    KeyNotFoundError,
    NotFoundError,
)
from badged.identity.store import AgentRecord, AgentStore, KeyVersion
from badged.keystore.port import KeyHandle, KeyStore

_logger = logging.getLogger(__name__)
# Relying parties allow clock skew: keep retired keys published a little longer.
PUBLISH_LEEWAY = 30
_AGENT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_TD_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,252}$")


def check_agent_name(name: str) -> str:
    if not _AGENT_RE.match(name):
        raise InvalidRequestError(
            f"bad agent name {name[:80]!r}",
            public="agent names are 1-63 chars of [a-z0-9._-], starting with a letter or digit",
        )
    return name


def check_trust_domain(td: str) -> str:
    if not _TD_RE.match(td):
        raise InvalidRequestError(f"bad trust domain {td!r}")
    return td


@dataclass(frozen=True)
class SigningKey:
    """A key handle ready to sign, with the identifiers credentials carry."""

    agent: str
    spiffe_id: str
    kid: str
    handle: KeyHandle
    version: int


class AgentRegistry:
    """The set of agent identities of this device. Thread-safe."""

    def __init__(self, *, store: AgentStore, keystore: KeyStore, clock: Clock,
                 trust_domain: str, max_token_ttl: int) -> None:
        self._store = store
        self._keystore = keystore
        self._clock = clock
        self._trust_domain = check_trust_domain(trust_domain)
        # Retired public keys stay published this long: no token outlives it.
        self._max_token_ttl = max_token_ttl
        self._lock = threading.RLock()
        self._agents = store.load()
        self._listeners: builtins.list[Callable[[str, str], None]] = []

    def add_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(agent, "rotated" | "revoked")`` once that change is saved.

        Whatever derives from an agent's current key (session keys, see
        badged.identity.session) must be dropped the moment it changes.
        Called with this registry's lock held: listeners must not call back.
        """
        self._listeners.append(listener)

    # -- queries ----------------------------------------------------------------

    def spiffe_id(self, name: str) -> str:
        return f"spiffe://{self._trust_domain}/agent/{name}"

    def list(self, include_revoked: bool = False) -> builtins.list[AgentRecord]:
        with self._lock:
            return [a for a in sorted(self._agents.values(), key=lambda a: a.name)
                    if include_revoked or a.status == "active"]

    def get(self, name: str) -> AgentRecord:
        with self._lock:
            rec = self._agents.get(name)
            if rec is None:
                raise NotFoundError(f"agent {name!r} not found")
            return rec

    def active(self, name: str) -> AgentRecord:
        rec = self.get(name)
        if rec.status != "active":
            raise FailedPreconditionError(f"agent {name!r} is revoked")
        return rec

    def token_key(self, name: str) -> SigningKey:
        rec = self.active(name)
        v = rec.current
        return SigningKey(name, rec.spiffe_id, v.token_kid, self._keystore.get(v.token_key), v.version)

    def sign_key(self, name: str) -> SigningKey:
        rec = self.active(name)
        v = rec.current
        return SigningKey(name, rec.spiffe_id, v.sign_kid, self._keystore.get(v.sign_key), v.version)

    def jwks(self) -> dict[str, builtins.list[dict[str, str]]]:
        """Token keys of active agents: current, plus retired ones still in use."""
        now = int(self._clock())
        keys: builtins.list[dict[str, str]] = []
        with self._lock:
            for rec in sorted(self._agents.values(), key=lambda a: a.name):
                if rec.status != "active":
                    continue
                for v in rec.versions:
                    if v.state == "active" or v.publish_until > now:
                        keys.append({**v.token_jwk, "kid": v.token_kid, "use": "sig",
                                     "alg": "ES256"})
        return {"keys": keys}

    # -- lifecycle ----------------------------------------------------------------

    def create(self, name: str, description: str = "") -> AgentRecord:
        check_agent_name(name)
        if len(description) > 256:
            raise InvalidRequestError("description too long", public="description: at most 256 chars")
        with self._lock:
            if name in self._agents:
                raise AlreadyExistsError(f"agent {name!r} exists")
            now = int(self._clock())
            version = self._new_version(name, 1, now)
            rec = AgentRecord(name=name, spiffe_id=self.spiffe_id(name), created_at=now,
                              description=description, versions=[version])
            self._agents[name] = rec
            self._save()
            _logger.info("agent created", extra={"agent": name, "kid": version.token_kid})
            return rec

    def rotate(self, name: str) -> AgentRecord:
        with self._lock:
            rec = self.active(name)
            now = int(self._clock())
            old = rec.current
            new = self._new_version(name, old.version + 1, now)
            old.state = "retired"
            old.retired_at = now
            old.publish_until = now + self._max_token_ttl + PUBLISH_LEEWAY
            rec.versions.append(new)
            self._save()
            self._notify(name, "rotated")
            # Metadata first, then destroy: a crash here leaves a doomed key
            # that reconcile() removes, never a retired key that still signs.
            self._destroy_quietly(old.token_key)
            self._destroy_quietly(old.sign_key)
            _logger.info("agent rotated", extra={"agent": name, "version": new.version})
            return rec

    def revoke(self, name: str, reason: str = "") -> AgentRecord:
        with self._lock:
            rec = self.get(name)
            if rec.status == "revoked":
                raise FailedPreconditionError(f"agent {name!r} already revoked")
            rec.status = "revoked"
            rec.revoked_at = int(self._clock())
            rec.revoke_reason = reason[:256]
            for v in rec.versions:
                if v.state == "active":
                    v.state = "retired"
                    v.retired_at = rec.revoked_at
                v.publish_until = 0
            self._save()
            self._notify(name, "revoked")  # before the hardware calls, which may fail
            for v in rec.versions:
                self._destroy_quietly(v.token_key)
                self._destroy_quietly(v.sign_key)
            _logger.info("agent revoked", extra={"agent": name})
            return rec

    def reconcile(self) -> builtins.list[str]:
        """Destroy token keys that metadata says must not exist (after a crash)."""
        with self._lock:
            wanted: set[str] = set()
            for rec in self._agents.values():
                if rec.status == "active":
                    v = rec.current
                    wanted |= {v.token_key, v.sign_key}
            swept = [k for k in self._keystore.list()
                     if k.startswith("badged/agent/") and k not in wanted]
            for key in swept:
                self._destroy_quietly(key)
            if swept:
                _logger.warning("swept keys without a live identity", extra={"count": len(swept)})
            return swept

    # -- helpers (lock held) -------------------------------------------------------

    def _new_version(self, name: str, version: int, now: int) -> KeyVersion:
        token_name = f"badged/agent/{name}/v{version}/tok"
        sign_name = f"badged/agent/{name}/v{version}/sig"
        handles: list[KeyHandle] = []
        for key_name in (token_name, sign_name):
            try:
                handles.append(self._keystore.generate(key_name))
            except KeyExistsError:
                # Orphan from a crash between key creation and metadata save.
                self._keystore.destroy(key_name)
                handles.append(self._keystore.generate(key_name))
        tok_jwk = ec_public_jwk(handles[0].public_key())
        sig_jwk = ec_public_jwk(handles[1].public_key())
        return KeyVersion(
            version=version, token_key=token_name, sign_key=sign_name,
            token_kid=jwk_thumbprint(tok_jwk), sign_kid=jwk_thumbprint(sig_jwk),
            token_jwk=tok_jwk, sign_jwk=sig_jwk, created_at=now,
        )

    def _destroy_quietly(self, key_name: str) -> None:
        try:
            self._keystore.destroy(key_name)
        except KeyNotFoundError:
            pass

    def _notify(self, name: str, event: str) -> None:
        for listener in self._listeners:
            listener(name, event)

    def _save(self) -> None:
        self._store.save(self._agents)
