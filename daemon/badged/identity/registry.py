"""Agent identities: lifecycle (create, rotate, revoke) over the key store.

Every agent has two keys per version, both generated inside the token:

* the *token key* signs access tokens and is published in the JWKS;
* the *sign key* serves ``Sign`` over caller data and is never in the JWKS;
* with the SSH agent socket enabled, an *ssh key* (``/ssh``) answers SSH agent
  sign requests (badged.sshagent) and is never used for anything else. Agents
  made before it was enabled get one at the next start (:meth:`ensure_ssh_keys`,
  the same change protocol, ``agent.ssh-key.intent`` / ``agent.ssh_key_added``).

Every change follows one protocol, so that a crash (kill -9, power loss) at
any point leaves the token, the registry file and the audit log agreeing, and
an operator who gets an error knows that nothing changed:

1. the change in flight is written durably to ``agents.pending.json``;
2. an *intent* record is made durable in the audit log (``agent.rotate.intent``);
3. new keys are generated in the token (each audited, ``key.created``);
4. a *copy* of the registry is changed and written durably (temp file, fsync,
   rename, directory fsync) -- this rename is the commit point;
5. a *completion* record is made durable (``agent.rotated``);
6. only then is the copy swapped in: from this instant the daemon signs with
   the new key, so every credential it signs comes after the audit record;
7. keys the change retired are destroyed (each audited, ``key.destroyed``) and
   the pending file is removed.

If step 4 fails the new keys are destroyed (audited) and the operator gets
:class:`~badged.errors.StateError`; in memory and in the registry nothing
changed. At start-up :meth:`AgentRegistry.reconcile` compares the pending
change with the registry and the audit log: a gap (intent without completion)
is recorded as ``registry.recovered``; keys the registry does not know are
never destroyed automatically -- the daemon refuses to start and names them
(``badged recover`` adopts or quarantines them).
"""

from __future__ import annotations

import builtins
import copy
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from badged.core.clock import Clock, Monotonic, monotonic_clock
from badged.core.jose import ec_public_jwk, jwk_thumbprint
from badged.core.tokens import JWK_AGENT_MEMBER
from badged.errors import (
    AlreadyExistsError,
    BadgedError,
    ConfigError,
    FailedPreconditionError,
    InvalidRequestError,
    KeyExistsError,
    KeyNotFoundError,
    KeyStoreError,
    NotFoundError,
    StateError,
)
from badged.identity.store import AgentRecord, AgentStore, KeyVersion
from badged.keystore.port import KeyHandle, KeyStore

_logger = logging.getLogger(__name__)
# Relying parties allow clock skew: keep retired keys published a little longer.
PUBLISH_LEEWAY = 30
_AGENT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_TD_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,252}$")
AGENT_KEY_PREFIX = "badged/agent/"
QUARANTINE_PREFIX = "badged/quarantine/"
_KEY_RE = re.compile(r"^badged/agent/(?P<agent>[a-z0-9][a-z0-9._-]{0,62})/v(?P<version>[1-9][0-9]{0,8})"
                     r"/(?P<role>tok|sig|ssh)$")
_MAX_KEY_NAME = 96

AuditFn = Callable[[Mapping[str, Any]], object]
"""Makes one audit event durable before returning (``AuditLog.append_sync``); raises if not."""
FindOp = Callable[[str], set[str]]
"""Event names the audit log holds for a registry change id (start-up recovery)."""


@runtime_checkable
class Relabeling(Protocol):
    """Key stores that can rename a key in place (quarantine without destroying)."""

    def relabel(self, name: str, new_name: str) -> None: ...


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


def key_names(agent: str, version: int) -> tuple[str, str]:
    """Token-key and sign-key names of one agent version, as labelled in the token."""
    return (f"{AGENT_KEY_PREFIX}{agent}/v{version}/tok", f"{AGENT_KEY_PREFIX}{agent}/v{version}/sig")


def ssh_key_name(agent: str, version: int) -> str:
    """The SSH purpose key of one agent version."""
    return f"{AGENT_KEY_PREFIX}{agent}/v{version}/ssh"


def parse_key_name(name: str) -> tuple[str, int, str] | None:
    """(agent, version, "tok" | "sig" | "ssh") of an agent key label, or None."""
    m = _KEY_RE.match(name)
    if m is None:
        return None
    return m.group("agent"), int(m.group("version")), m.group("role")


def quarantine_name(name: str, taken: Iterable[str]) -> str:
    """Where a key goes in quarantine: ``badged/quarantine/agent/NAME/vN/tok``.

    Readable when it fits the 96-character key-name limit and is free,
    else a short unique name (the audit record keeps the mapping).
    """
    used = set(taken)
    rest = name[len("badged/"):] if name.startswith("badged/") else name
    candidate = QUARANTINE_PREFIX + rest
    n = 1
    while len(candidate) <= _MAX_KEY_NAME and candidate in used:
        n += 1
        candidate = f"{QUARANTINE_PREFIX}{rest}.{n}"
    if len(candidate) > _MAX_KEY_NAME or candidate in used:
        while True:
            candidate = f"{QUARANTINE_PREFIX}k-{secrets.token_hex(8)}"
            if candidate not in used:
                break
    return candidate


def quarantine_key(keystore: KeyStore, name: str, audit: AuditFn | None, *, reason: str,
                   op: str = "", **extra: Any) -> str:
    """Relabel ``name`` out of the agent namespace (never destroys); audited first.

    The audit record is written before the relabel: a crash in between leaves
    the key under its old name, and the next start-up quarantines it again.
    """
    if not isinstance(keystore, Relabeling):
        raise KeyStoreError(f"the {keystore.backend} key store cannot relabel keys",
                            backend=keystore.backend)
    new = quarantine_name(name, keystore.list())
    kid = _kid_or_empty(keystore, name)
    if audit is not None:
        audit({"event": "key.quarantined", "key": name, "quarantined_as": new, "kid": kid,
               "reason": reason, "op": op, **extra})
    keystore.relabel(name, new)
    _logger.warning("key quarantined", extra={"key": name, "as": new, "reason": reason})
    return new


def _kid_or_empty(keystore: KeyStore, name: str) -> str:
    try:
        return jwk_thumbprint(ec_public_jwk(keystore.get(name).public_key()))
    except BadgedError:
        return ""


@dataclass(frozen=True)
class SigningKey:
    """A key handle ready to sign, with the identifiers credentials carry."""

    agent: str
    spiffe_id: str
    kid: str
    handle: KeyHandle
    version: int


@dataclass
class ReconcileReport:
    """What start-up (or ``badged recover``) did to bring token and registry together."""

    destroyed: builtins.list[str] = field(default_factory=builtins.list)
    quarantined: dict[str, str] = field(default_factory=dict)
    adopted: builtins.list[str] = field(default_factory=builtins.list)
    missing: builtins.list[str] = field(default_factory=builtins.list)
    recovered_op: str | None = None


class UnregisteredKeysError(ConfigError):
    """Agent keys in the token that the registry does not know: refuse to start."""

    def __init__(self, keys: builtins.list[str]) -> None:
        shown = ", ".join(keys[:6]) + (f", ... ({len(keys) - 6} more)" if len(keys) > 6 else "")
        super().__init__(
            f"key store: {len(keys)} keys have no registry entry ({shown}): run 'badged recover "
            "--adopt' to rebuild the registry from them or 'badged recover --quarantine' to set "
            "them aside (with the same --config or --dev STATE_DIR); nothing was destroyed")
        self.keys = keys


class AgentRegistry:
    """The set of agent identities of this device. Thread-safe."""

    def __init__(self, *, store: AgentStore, keystore: KeyStore, clock: Clock,
                 trust_domain: str, max_token_ttl: int, audit: AuditFn | None = None,
                 monotonic: Monotonic = monotonic_clock) -> None:
        self._store = store
        self._keystore = keystore
        self._clock = clock
        self._mono = monotonic
        self._trust_domain = check_trust_domain(trust_domain)
        # Retired public keys stay published this long: no token outlives it.
        self._max_token_ttl = max_token_ttl
        self._lock = threading.RLock()
        self._agents = store.load()
        # token kid -> when its publication ends on the monotonic clock. The
        # record keeps publish_until (wall time); a retired key leaves the
        # JWKS only once both have passed, so a forward wall-clock step never
        # unpublishes a key whose tokens are still live (issue 15, docs/time.md).
        self._publish_mono: dict[str, float] = {}
        self._place_publications()
        self._listeners: builtins.list[Callable[[str, str], None]] = []
        self._audit_fn = audit
        # Set when a change could be neither completed nor undone (the audit
        # log failed too): further changes wait for the restart that resolves it.
        self._unresolved: str | None = None
        # The change in flight (lock held from _begin to the end of the change).
        self._op_kind = ""
        self._op_agent = ""
        self._op_keys: builtins.list[str] = []
        self._op_caller: dict[str, Any] = {}
        # New key versions get an SSH purpose key (set by the app when [ssh] is on).
        self.ssh_keys = False

    def add_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(agent, "rotated" | "revoked")`` once that change is saved.

        Whatever derives from an agent's current key (session keys, see
        badged.identity.session) must be dropped the moment it changes.
        Called with this registry's lock held: listeners must not call back.
        """
        self._listeners.append(listener)

    def set_audit(self, audit: AuditFn) -> None:
        """Attach the audit log (it is opened after the registry is loaded)."""
        self._audit_fn = audit

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

    def ssh_key(self, name: str) -> SigningKey | None:
        """The agent's current SSH key; None while it has none (SSH off when made)."""
        rec = self.active(name)
        v = rec.current
        if not v.ssh_key:
            return None
        return SigningKey(name, rec.spiffe_id, jwk_thumbprint(v.ssh_jwk),
                          self._keystore.get(v.ssh_key), v.version)

    def ensure_ssh_keys(self, *, caller: Mapping[str, Any] | None = None) -> builtins.list[str]:
        """Give every active agent whose current version lacks one an SSH key.

        One registry change per agent, through the same protocol as rotate
        (pending file, intent, key.created, durable save, completion), so a
        crash mid-way is recovered at start like any other change. Returns
        the agents that got a key.
        """
        done: builtins.list[str] = []
        with self._lock:
            for name in sorted(self._agents):
                rec = self._agents[name]
                if rec.status != "active" or rec.current.ssh_key:
                    continue
                version = rec.current.version
                key_name = ssh_key_name(name, version)
                op = self._begin("ssh-key", name, [key_name], caller, version=version)
                jwk = self._generate_audited(key_name, op)
                new, changed_rec = self._copy_with(name)
                changed = changed_rec.current
                changed.ssh_key, changed.ssh_jwk = key_name, jwk
                self._commit(op, new, {"event": "agent.ssh_key_added", "version": version,
                                       "ssh_kid": jwk_thumbprint(jwk), "key": key_name})
                self._finish(op)
                done.append(name)
        return done

    def jwks(self) -> dict[str, builtins.list[dict[str, str]]]:
        """Token keys of active agents: current, plus retired ones still in use.

        A retired key stays while its wall deadline (``publish_until``) *or*
        its monotonic one has not passed: a wall step forward cannot cut it
        short, a step back keeps it at most the step longer (its private half
        is already destroyed, so that is harmless).
        """
        keys: builtins.list[dict[str, str]] = []
        with self._lock:
            self._place_publications()
            now, mono = int(self._clock()), self._mono()
            for rec in sorted(self._agents.values(), key=lambda a: a.name):
                if rec.status != "active":
                    continue
                for v in rec.versions:
                    if v.state == "active" or v.publish_until > now or \
                            self._publish_mono.get(v.token_kid, 0.0) > mono:
                        # Each key names its agent: a verifier refuses a
                        # token whose sub is another agent than its signer.
                        keys.append({**v.token_jwk, "kid": v.token_kid, "use": "sig",
                                     "alg": "ES256", JWK_AGENT_MEMBER: rec.spiffe_id})
        return {"keys": keys}

    def _place_publications(self) -> None:
        """Put every retired key's remaining publication on the monotonic clock.

        Done once per key: at load (a restart only has the recorded wall time,
        so the remaining time is ``publish_until - now``, as for grants) or
        right after the change that retired it; entries of keys no longer
        published are dropped, so the table stays as small as the JWKS.
        """
        with self._lock:
            now, mono = self._clock(), self._mono()
            live: set[str] = set()
            for rec in self._agents.values():
                if rec.status != "active":
                    continue
                for v in rec.versions:
                    if v.state != "retired":
                        continue
                    end = self._publish_mono.get(v.token_kid)
                    if end is None and v.publish_until > now:
                        end = self._publish_mono[v.token_kid] = mono + (v.publish_until - now)
                    if end is not None and (end > mono or v.publish_until > now):
                        live.add(v.token_kid)
            for kid in [k for k in self._publish_mono if k not in live]:
                del self._publish_mono[kid]

    # -- lifecycle ----------------------------------------------------------------

    def create(self, name: str, description: str = "", *,
               caller: Mapping[str, Any] | None = None) -> AgentRecord:
        check_agent_name(name)
        if len(description) > 256:
            raise InvalidRequestError("description too long", public="description: at most 256 chars")
        with self._lock:
            if name in self._agents:
                raise AlreadyExistsError(f"agent {name!r} exists")
            op = self._begin("create", name, self._version_keys(name, 1), caller,
                             description=description)
            now = int(self._clock())
            version = self._new_version(name, 1, now, op)
            rec = AgentRecord(name=name, spiffe_id=self.spiffe_id(name), created_at=now,
                              description=description, versions=[version])
            new = dict(self._agents)
            new[name] = rec
            self._commit(op, new, {"event": "agent.created", "version": 1,
                                   "kid": version.token_kid, "sign_kid": version.sign_kid,
                                   "description": description})
            self._finish(op)
            _logger.info("agent created", extra={"agent": name, "kid": version.token_kid})
            return copy.deepcopy(rec)

    def rotate(self, name: str, *, caller: Mapping[str, Any] | None = None) -> AgentRecord:
        with self._lock:
            rec = self.active(name)
            old = rec.current
            op = self._begin("rotate", name, self._version_keys(name, old.version + 1), caller,
                             version=old.version + 1)
            now = int(self._clock())
            new_version = self._new_version(name, old.version + 1, now, op)
            new, changed = self._copy_with(name)
            retired = changed.current
            retired.state = "retired"
            retired.retired_at = now
            retired.publish_until = now + self._max_token_ttl + PUBLISH_LEEWAY
            changed.versions.append(new_version)
            self._commit(op, new, {"event": "agent.rotated", "version": new_version.version,
                                   "kid": new_version.token_kid,
                                   "sign_kid": new_version.sign_kid,
                                   "retired_kid": retired.token_kid,
                                   "destroys": _keys_of(retired)})
            self._place_publications()
            self._notify(name, "rotated")
            # Committed and audited: the retired private keys go now (their
            # public half stays published until publish_until).
            self._destroy_audited(op, _keys_of(retired), "retired by rotate")
            self._finish(op)
            _logger.info("agent rotated", extra={"agent": name, "version": new_version.version})
            return copy.deepcopy(changed)

    def revoke(self, name: str, reason: str = "", *,
               caller: Mapping[str, Any] | None = None) -> AgentRecord:
        with self._lock:
            rec = self.get(name)
            if rec.status == "revoked":
                raise FailedPreconditionError(f"agent {name!r} already revoked")
            op = self._begin("revoke", name, [], caller, reason=reason[:256])
            new, changed = self._copy_with(name)
            changed.status = "revoked"
            changed.revoked_at = int(self._clock())
            changed.revoke_reason = reason[:256]
            doomed: builtins.list[str] = []
            for v in changed.versions:
                if v.state == "active":
                    v.state = "retired"
                    v.retired_at = changed.revoked_at
                v.publish_until = 0
                doomed += _keys_of(v)
            self._commit(op, new, {"event": "agent.revoked", "reason": reason[:256],
                                   "destroys": doomed})
            self._notify(name, "revoked")  # before the hardware calls, which may fail
            self._destroy_audited(op, doomed, "revoked")
            self._finish(op)
            _logger.info("agent revoked", extra={"agent": name})
            return copy.deepcopy(changed)

    # -- start-up ------------------------------------------------------------------

    def reconcile(self, find_op: FindOp | None = None, *, orphans: str = "refuse",
                  history: Iterable[Mapping[str, Any]] | None = None) -> ReconcileReport:
        """Bring token, registry and audit log together after a stop or a crash.

        * a change in flight (pending file) is finished: its intent without a
          completion is recorded as ``registry.recovered`` (applied or not,
          decided by the registry file, the commit point); keys it made that
          the registry does not hold are quarantined;
        * keys the registry retired or revoked are destroyed (the committed
          change said so; each destruction audited);
        * any other agent key the registry does not know is an *orphan*:
          ``orphans="refuse"`` raises :class:`UnregisteredKeysError` before
          anything is changed; ``"quarantine"`` relabels them; ``"adopt"``
          rebuilds registry entries from their labels and ``history`` (audit
          records), quarantining what cannot be adopted.
        """
        with self._lock:
            report = ReconcileReport()
            pending = self._store.read_pending()
            # Adopting into a lost registry: the file cannot say whether the
            # change in flight was applied, so its keys go to adoption (which
            # prefers versions the audit log says were completed).
            lost = orphans == "adopt" and not self._store.exists()
            pending_keys = set(pending.get("keys") or []) if pending and not lost else set()
            wanted, registered = self._key_sets()
            listed = self._keystore.list()
            in_token = [k for k in listed if k.startswith(AGENT_KEY_PREFIX)]
            strays = [k for k in in_token if k not in registered and k not in pending_keys]
            if strays and orphans == "refuse":
                raise UnregisteredKeysError(strays)
            if pending is not None:
                report.recovered_op = self._recover_pending(pending, find_op, report,
                                                            registry_lost=lost)
            for key in in_token:
                if key in wanted or key in strays:
                    continue
                if key in registered:
                    self._destroy_audited(str(pending.get("op", "")) if pending else "", [key],
                                          "retired or revoked in the registry (finished at start)")
                    report.destroyed.append(key)
            if strays:
                if orphans == "adopt":
                    self._adopt(strays, history or [], report)
                else:
                    for key in strays:
                        report.quarantined[key] = quarantine_key(
                            self._keystore, key, self._audit_fn, reason="operator: badged recover "
                            "--quarantine (no registry entry)")
            # The token's list again only if something above changed it: each
            # list() walks every object of the token (issue 22: start-up time).
            changed = pending is not None or bool(strays) or bool(report.destroyed)
            present = set(self._keystore.list()) if changed else set(listed)
            report.missing = sorted(k for k in wanted if k not in present)
            if report.missing:
                _logger.error("registry keys missing from the token; those agents cannot sign",
                              extra={"keys": report.missing})
            if pending is not None:
                self._store.clear_pending()
            return report

    def _recover_pending(self, pending: Mapping[str, Any], find_op: FindOp | None,
                         report: ReconcileReport, *, registry_lost: bool = False) -> str:
        op_id = str(pending.get("op", ""))
        kind = str(pending.get("kind", "unknown"))
        agent = str(pending.get("agent", ""))
        keys = [str(k) for k in pending.get("keys") or []]
        events = find_op(op_id) if (find_op is not None and op_id) else set()
        _, registered = self._key_sets()
        if kind == "revoke":
            rec = self._agents.get(agent)
            applied = rec is not None and rec.status == "revoked"
        else:
            applied = any(k in registered for k in keys)
        had_intent = any(e.endswith(".intent") for e in events)
        finished = any(e.endswith(".aborted") or e == "registry.recovered" for e in events)
        completed = any(not e.endswith(".intent") and e.startswith("agent.") for e in events)
        if (had_intent or completed) and not finished and not (completed and applied):
            # The gap: an intent (or a completion the registry does not
            # reflect) with nothing after it. Record what the commit point says.
            kids = [v.token_kid for rec in self._agents.values() for v in rec.versions
                    if v.token_key in keys] if applied else []
            outcome = "applied" if applied else "not-applied"
            if registry_lost:
                outcome = "registry-lost: keys left to adoption"
            self._audit({"event": "registry.recovered", "op": op_id, "change": kind,
                         "agent": agent, "outcome": outcome,
                         "keys": keys, "kid": kids[0] if kids else None})
        elif not had_intent and not completed:
            _logger.info("registry change never started (no intent record)",
                         extra={"op": op_id, "change": kind})
        for key in [] if registry_lost else keys:
            if key not in registered and key in set(self._keystore.list()):
                report.quarantined[key] = quarantine_key(
                    self._keystore, key, self._audit_fn, op=op_id,
                    reason=f"made by an interrupted {kind} of {agent} that did not take effect")
        _logger.warning("registry change in flight at the last stop resolved",
                        extra={"op": op_id, "change": kind, "applied": applied})
        return op_id

    def _adopt(self, strays: builtins.list[str], history: Iterable[Mapping[str, Any]],
               report: ReconcileReport) -> None:
        """Rebuild registry entries from orphan key labels and the audit log."""
        groups: dict[str, dict[int, dict[str, str]]] = {}
        leftovers: builtins.list[tuple[str, str]] = []
        for key in strays:
            parsed = parse_key_name(key)
            if parsed is None:
                leftovers.append((key, "label is not badged/agent/NAME/vN/tok|sig"))
                continue
            agent, version, role = parsed
            groups.setdefault(agent, {}).setdefault(version, {})[role] = key
        past = _History(history)
        new = dict(self._agents)  # adds records, changes none
        adopted: builtins.list[tuple[AgentRecord, bool]] = []
        now = int(self._clock())
        for agent, versions in sorted(groups.items()):
            complete = sorted(v for v, roles in versions.items() if {"tok", "sig"} <= roles.keys())
            reason = ""
            if agent in new:
                reason = "agent already in the registry with other keys"
            elif not complete:
                reason = "no complete token+sign key pair"
            elif past.revoked(agent):
                reason = "the audit log says this agent was revoked"
            if reason:
                leftovers += [(k, reason) for roles in versions.values() for k in roles.values()]
                continue
            # The newest version the audit log says was completed; without
            # one (history lost too), the newest complete pair.
            audited = [v for v in complete
                       if past.kid_time(jwk_thumbprint(ec_public_jwk(
                           self._keystore.get(versions[v]["tok"]).public_key()))) is not None]
            best = (audited or complete)[-1]
            tok_name, sig_name = versions[best]["tok"], versions[best]["sig"]
            tok_jwk = ec_public_jwk(self._keystore.get(tok_name).public_key())
            sig_jwk = ec_public_jwk(self._keystore.get(sig_name).public_key())
            tok_kid = jwk_thumbprint(tok_jwk)
            created = past.created(agent)
            kv = KeyVersion(version=best, token_key=tok_name, sign_key=sig_name,
                                 token_kid=tok_kid, sign_kid=jwk_thumbprint(sig_jwk),
                                 token_jwk=tok_jwk, sign_jwk=sig_jwk,
                                 created_at=past.kid_time(tok_kid) or now)
            if "ssh" in versions[best]:
                kv.ssh_key = versions[best]["ssh"]
                kv.ssh_jwk = ec_public_jwk(self._keystore.get(kv.ssh_key).public_key())
            rec = AgentRecord(name=agent, spiffe_id=self.spiffe_id(agent),
                              created_at=created[0] if created else now,
                              description=created[1] if created else "", versions=[kv])
            new[agent] = rec
            adopted.append((rec, past.kid_time(tok_kid) is not None))
            leftovers += [(k, f"older than the adopted version v{best}")
                          for n, roles in versions.items() if n != best for k in roles.values()]
        op = secrets.token_hex(8)
        self._audit({"event": "registry.adopt.intent", "op": op,
                     "agents": [r.name for r, _ in adopted]})
        for key, why in leftovers:
            report.quarantined[key] = quarantine_key(self._keystore, key, self._audit_fn,
                                                     reason=f"not adopted: {why}", op=op)
        try:
            self._store.save(new)
        except OSError as exc:
            self._audit({"event": "registry.adopt.aborted", "op": op,
                         "reason": f"registry not saved: {exc.strerror}"})
            raise StateError(f"agent registry not saved: {exc}") from None
        for rec, matched in adopted:
            v = rec.current
            self._audit({"event": "agent.adopted", "op": op, "agent": rec.name,
                         "version": v.version, "kid": v.token_kid, "sign_kid": v.sign_kid,
                         "keys": _keys_of(v), "audit_match": matched})
            report.adopted += _keys_of(v)
        self._agents = new

    # -- the change protocol (lock held) ----------------------------------------------

    def _copy_with(self, name: str) -> tuple[dict[str, AgentRecord], AgentRecord]:
        """A copy of the registry whose record ``name`` may be changed (copy on write).

        Records in ``self._agents`` are never changed in place: a change
        copies the one record it touches into a new dict, and only the
        commit swaps that dict in. A deep copy of every agent per change grew
        with the registry (issue 22: ~1,000 agents made each creation slower);
        sharing the untouched records is safe because nothing mutates them,
        and it lets the store re-encode only the record that changed.
        """
        new = dict(self._agents)
        rec = new[name] = copy.deepcopy(self._agents[name])
        return new, rec

    def _begin(self, kind: str, agent: str, keys: builtins.list[str],
               caller: Mapping[str, Any] | None, **fields: Any) -> str:
        """Steps 1-2: pending file, then the intent record. Raises: nothing changed."""
        if self._unresolved is not None:
            raise FailedPreconditionError(
                f"an earlier registry change ({self._unresolved}) could not be completed or "
                "undone; restart badged to recover it")
        op = secrets.token_hex(8)
        try:
            self._store.write_pending({"op": op, "kind": kind, "agent": agent, "keys": keys})
        except OSError as exc:
            raise StateError(f"agent registry change not started: {exc}") from None
        who = dict(caller) if caller is not None else {"internal": "badged"}
        try:
            self._audit({"event": f"agent.{kind}.intent", "op": op, "agent": agent,
                         "keys": keys, "caller": who, **fields})
        except BaseException:
            self._clear_pending_quietly()
            raise
        self._op_caller, self._op_kind, self._op_agent, self._op_keys = who, kind, agent, keys
        return op

    def _commit(self, op: str, new: dict[str, AgentRecord], completion: dict[str, Any]) -> None:
        """Steps 4-6: durable save, completion record, swap. Undoes on failure."""
        try:
            self._store.save(new)
        except OSError as exc:
            self._abort(op, f"registry not saved: {exc.strerror or exc}")
            raise StateError(f"agent registry not saved ({exc}); nothing changed") from None
        try:
            self._audit({**completion, "op": op, "agent": self._op_agent,
                         "caller": self._op_caller, "decision": "allow"})
        except BaseException:
            # Not audited: it must not take effect. Put the old file back; the
            # keys made stay (their destruction could not be audited either)
            # until start-up recovery quarantines them.
            try:
                self._store.save(self._agents)
            except OSError:
                _logger.error("registry change saved but not audited, and the old registry "
                              "could not be restored; start-up recovery will record it",
                              extra={"op": op})
            self._unresolved = op
            raise
        self._agents = new

    def _abort(self, op: str, why: str) -> None:
        """A change failed before its commit: undo the keys it made, audited."""
        left: builtins.list[str] = []
        try:
            # Names the intent declared did not exist when it began (a clash
            # was quarantined first), so any key by those names is this change's.
            present = set(self._keystore.list())
            made = [k for k in self._op_keys if k in present]
        except BadgedError:
            made = list(self._op_keys)
        try:
            self._audit({"event": f"agent.{self._op_kind}.aborted", "op": op,
                         "agent": self._op_agent, "reason": why, "destroys": made})
        except BadgedError:
            self._unresolved = op  # cannot audit the destruction: leave keys for start-up
            return
        for key in made:
            try:
                self._keystore.destroy(key)
            except KeyNotFoundError:
                pass
            except BadgedError:
                left.append(key)
                continue
            self._audit_quietly({"event": "key.destroyed", "key": key, "op": op,
                                 "reason": "change aborted"})
        if left:
            self._unresolved = op
            _logger.error("keys of an aborted change could not be destroyed; start-up "
                          "recovery will quarantine them", extra={"keys": left})
        else:
            self._clear_pending_quietly()

    def _finish(self, op: str) -> None:
        self._clear_pending_quietly()

    def _version_keys(self, name: str, version: int) -> builtins.list[str]:
        """Every key one new version will have (what the intent record names)."""
        keys = list(key_names(name, version))
        return [*keys, ssh_key_name(name, version)] if self.ssh_keys else keys

    def _generate_audited(self, key_name: str, op: str) -> dict[str, str]:
        """Generate one key of change ``op`` (audited); aborts the change on failure."""
        try:
            try:
                handle = self._keystore.generate(key_name)
            except KeyExistsError:
                # A key of that name the registry does not know (made out of
                # band, or left by a change that could not be undone):
                # never destroyed, set aside with an audit record.
                quarantine_key(self._keystore, key_name, self._audit_fn, op=op,
                               reason="name needed by a new key version")
                handle = self._keystore.generate(key_name)
            jwk = ec_public_jwk(handle.public_key())
            self._audit({"event": "key.created", "key": key_name, "op": op,
                         "kid": jwk_thumbprint(jwk)})
        except BaseException as exc:
            self._abort(op, f"key generation failed: {exc}")
            raise
        return jwk

    def _new_version(self, name: str, version: int, now: int, op: str) -> KeyVersion:
        token_name, sign_name = key_names(name, version)
        tok_jwk = self._generate_audited(token_name, op)
        sig_jwk = self._generate_audited(sign_name, op)
        kv = KeyVersion(
            version=version, token_key=token_name, sign_key=sign_name,
            token_kid=jwk_thumbprint(tok_jwk), sign_kid=jwk_thumbprint(sig_jwk),
            token_jwk=tok_jwk, sign_jwk=sig_jwk, created_at=now,
        )
        if self.ssh_keys:
            kv.ssh_key = ssh_key_name(name, version)
            kv.ssh_jwk = self._generate_audited(kv.ssh_key, op)
        return kv

    def _destroy_audited(self, op: str, keys: builtins.list[str], reason: str) -> None:
        """Destroy keys a committed change retired; each destruction audited."""
        for key in keys:
            try:
                self._keystore.destroy(key)
            except KeyNotFoundError:
                continue
            except BadgedError as exc:
                # Committed already; start-up finishes it.
                _logger.error("retired key not destroyed yet", extra={"key": key, "error": str(exc)})
                continue
            self._audit_quietly({"event": "key.destroyed", "key": key, "op": op,
                                 "reason": reason})

    def _key_sets(self) -> tuple[set[str], set[str]]:
        """(keys that must exist: current of active agents, every key the registry names)."""
        wanted: set[str] = set()
        registered: set[str] = set()
        for rec in self._agents.values():
            for v in rec.versions:
                registered.update(_keys_of(v))
            if rec.status == "active":
                wanted.update(_keys_of(rec.current))
        return wanted, registered

    def _audit(self, event: Mapping[str, Any]) -> None:
        if self._audit_fn is not None:
            self._audit_fn(event)

    def _audit_quietly(self, event: Mapping[str, Any]) -> None:
        """For records after the commit point: the change stands even if this fails."""
        try:
            self._audit(event)
        except (BadgedError, OSError, ValueError) as exc:
            _logger.error("audit record lost after a committed change",
                          extra={"event": event.get("event"), "error": str(exc)})

    def _clear_pending_quietly(self) -> None:
        try:
            self._store.clear_pending()
        except OSError as exc:
            # Harmless: start-up sees a resolved change and only removes the file.
            _logger.warning("pending-change file not removed", extra={"error": str(exc)})

    def _notify(self, name: str, event: str) -> None:
        for listener in self._listeners:
            listener(name, event)


class _History:
    """What the audit log says about agents, for adoption."""

    def __init__(self, records: Iterable[Mapping[str, Any]]) -> None:
        self._created: dict[str, tuple[int, str, int]] = {}
        self._revoked: dict[str, int] = {}
        self._kids: dict[str, int] = {}
        for rec in records:
            event, agent, seq = rec.get("event"), rec.get("agent"), rec.get("seq", 0)
            if not isinstance(agent, str) or not isinstance(seq, int):
                continue
            when = _epoch(rec.get("time"))
            if event == "agent.created":
                self._created[agent] = (when, str(rec.get("description", "")), seq)
            elif event == "agent.revoked":
                self._revoked[agent] = seq
            completed = event in ("agent.created", "agent.rotated", "agent.adopted") or (
                event == "registry.recovered" and rec.get("outcome") == "applied")
            if completed and isinstance(rec.get("kid"), str):
                self._kids[str(rec["kid"])] = when

    def revoked(self, agent: str) -> bool:
        created = self._created.get(agent)
        revoked = self._revoked.get(agent)
        return revoked is not None and (created is None or revoked > created[2])

    def created(self, agent: str) -> tuple[int, str] | None:
        c = self._created.get(agent)
        return (c[0], c[1]) if c else None

    def kid_time(self, kid: str) -> int | None:
        return self._kids.get(kid)


def _keys_of(v: KeyVersion) -> builtins.list[str]:
    """The private keys of one version in the token (the SSH key only if it has one)."""
    return [v.token_key, v.sign_key] + ([v.ssh_key] if v.ssh_key else [])


def _epoch(value: object) -> int:
    if not isinstance(value, str):
        return 0
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
