"""Step-up grants and delegations: runtime policy state, persisted.

Kept in ``private/grants.json`` (atomic replace, 0600) so a restart neither
loses an operator's step-up nor resurrects a revoked one. Expired entries are
kept for a day for ``list --all`` and then dropped.

Time (issue 15: after a -15 s step of the wall clock a 30 s grant was still
active 40 s later): the file and the audit log keep the *record* -- wall-clock
``created_at``/``expires_at`` as granted. In memory every entry counts down on
the monotonic clock: when it is granted or loaded, its start and end are
placed on the monotonic clock (``span``), and what :meth:`GrantStore.grants`
and :meth:`GrantStore.delegations` hand out are the same entries with
``created_at``/``expires_at`` projected onto the wall clock of *now*. A 30 s
grant therefore lasts 30 s whatever the wall clock does while the daemon
runs. Across a restart only the wall clock carries over: the remaining time
is ``expires_at - now`` at load (docs/time.md).
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

from badged.core.clock import Clock, Monotonic, monotonic_clock
from badged.core.context import Context
from badged.errors import ConfigError, NotFoundError
from badged.fsutil import atomic_write
from badged.policy.model import Delegation, Grant

_KEEP_EXPIRED = 86400
_T = TypeVar("_T", Grant, Delegation)


class GrantStore:
    def __init__(self, path: Path, clock: Clock, monotonic: Monotonic = monotonic_clock) -> None:
        self._path = path
        self._clock = clock
        self._mono = monotonic
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}
        self._delegations: dict[str, Delegation] = {}
        # id -> (start, end) on the monotonic clock: what actually counts down.
        self._span: dict[str, tuple[float, float]] = {}
        self._load()

    def _place(self, entry_id: str, created_at: float, expires_at: float) -> None:
        """Put a recorded (wall-clock) lifetime on the monotonic clock, as of now."""
        wall, mono = self._clock(), self._mono()
        self._span[entry_id] = (mono - (wall - created_at), mono + (expires_at - wall))

    def _view(self, entry: _T) -> _T:
        """The entry with its lifetime projected onto the wall clock of now."""
        start, end = self._span[entry.id]
        wall, mono = self._clock(), self._mono()
        return replace(entry, created_at=wall - (mono - start), expires_at=wall + (end - mono))

    def _load(self) -> None:
        if not self._path.exists():
            return
        try:
            doc = json.loads(self._path.read_text())
            for g in doc.get("grants", []):
                g["context"] = tuple((str(k), str(v)) for k, v in g.get("context", ()))
                grant = Grant(**g)
                self._grants[grant.id] = grant
                self._place(grant.id, grant.created_at, grant.expires_at)
            for d in doc.get("delegations", []):
                d["audiences"] = frozenset(d["audiences"])
                d["scopes"] = frozenset(d["scopes"])
                deleg = Delegation(**d)
                self._delegations[deleg.id] = deleg
                self._place(deleg.id, deleg.created_at, deleg.expires_at)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"grant store is corrupt: {exc}", path=str(self._path)) from None

    def _save(self) -> None:
        horizon = self._mono() - _KEEP_EXPIRED
        self._grants = {k: g for k, g in self._grants.items() if self._span[k][1] > horizon}
        self._delegations = {k: d for k, d in self._delegations.items()
                             if self._span[k][1] > horizon}
        live = self._grants.keys() | self._delegations.keys()
        self._span = {k: v for k, v in self._span.items() if k in live}

        def enc(obj: Any) -> Any:
            if isinstance(obj, frozenset):
                return sorted(obj)
            raise TypeError(type(obj))

        doc = {"grants": [asdict(g) for g in self._grants.values()],
               "delegations": [asdict(d) for d in self._delegations.values()]}
        atomic_write(self._path, json.dumps(doc, default=enc, sort_keys=True).encode())

    # -- step-ups -------------------------------------------------------------------

    def add_grant(self, *, agent: str, bundle: str, duration: int, reason: str,
                  granted_by: str, context: Context = ()) -> Grant:
        """``context``: limit the step-up to requests carrying these pairs (issue 21)."""
        now = self._clock()
        g = Grant(id="g-" + secrets.token_hex(6), agent=agent, bundle=bundle, created_at=now,
                  expires_at=now + duration, reason=reason, granted_by=granted_by,
                  context=context)
        with self._lock:
            self._grants[g.id] = g
            self._place(g.id, g.created_at, g.expires_at)
            self._save()
        return g

    def revoke_grant(self, grant_id: str) -> Grant:
        with self._lock:
            g = self._grants.get(grant_id)
            if g is None:
                raise NotFoundError(f"grant {grant_id!r} not found")
            g = replace(g, revoked=True)
            self._grants[grant_id] = g
            self._save()
        return g

    def grants(self) -> list[Grant]:
        """Every grant, its lifetime projected onto the wall clock of now."""
        with self._lock:
            return [self._view(g) for g in sorted(self._grants.values(), key=lambda g: g.created_at)]

    # -- delegations ----------------------------------------------------------------

    def add_delegation(self, *, user: str, uid: int, agent: str, audiences: frozenset[str],
                       scopes: frozenset[str], duration: int, reason: str) -> Delegation:
        now = self._clock()
        d = Delegation(id="d-" + secrets.token_urlsafe(12), user=user, uid=uid, agent=agent,
                       audiences=audiences, scopes=scopes, created_at=now,
                       expires_at=now + duration, reason=reason)
        with self._lock:
            self._delegations[d.id] = d
            self._place(d.id, d.created_at, d.expires_at)
            self._save()
        return d

    def revoke_delegation(self, delegation_id: str) -> Delegation:
        with self._lock:
            d = self._delegations.get(delegation_id)
            if d is None:
                raise NotFoundError("delegation not found")
            d = replace(d, revoked=True)
            self._delegations[delegation_id] = d
            self._save()
        return d

    def delegations(self) -> dict[str, Delegation]:
        """Every delegation, its lifetime projected onto the wall clock of now."""
        with self._lock:
            return {k: self._view(d) for k, d in self._delegations.items()}
