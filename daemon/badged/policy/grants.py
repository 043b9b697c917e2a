"""Step-up grants and delegations: runtime policy state, persisted.

Kept in ``private/grants.json`` (atomic replace, 0600) so a restart neither
loses an operator's step-up nor resurrects a revoked one. Expired entries are
kept for a day for ``list --all`` and then dropped.
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from badged.core.clock import Clock
from badged.errors import ConfigError, NotFoundError
from badged.fsutil import atomic_write
from badged.policy.model import Delegation, Grant

_KEEP_EXPIRED = 86400


class GrantStore:
    def __init__(self, path: Path, clock: Clock) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}
        self._delegations: dict[str, Delegation] = {}
        self._load()

    def _load(self) -> None:
        if not self._path.exists():
            return
        try:
            doc = json.loads(self._path.read_text())
            for g in doc.get("grants", []):
                self._grants[g["id"]] = Grant(**g)
            for d in doc.get("delegations", []):
                d["audiences"] = frozenset(d["audiences"])
                d["scopes"] = frozenset(d["scopes"])
                self._delegations[d["id"]] = Delegation(**d)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"grant store is corrupt: {exc}", path=str(self._path)) from None

    def _save(self) -> None:
        horizon = self._clock() - _KEEP_EXPIRED
        self._grants = {k: g for k, g in self._grants.items() if g.expires_at > horizon}
        self._delegations = {k: d for k, d in self._delegations.items() if d.expires_at > horizon}

        def enc(obj: Any) -> Any:
            if isinstance(obj, frozenset):
                return sorted(obj)
            raise TypeError(type(obj))

        doc = {"grants": [asdict(g) for g in self._grants.values()],
               "delegations": [asdict(d) for d in self._delegations.values()]}
        atomic_write(self._path, json.dumps(doc, default=enc, sort_keys=True).encode())

    # -- step-ups -------------------------------------------------------------------

    def add_grant(self, *, agent: str, bundle: str, duration: int, reason: str,
                  granted_by: str) -> Grant:
        now = self._clock()
        g = Grant(id="g-" + secrets.token_hex(6), agent=agent, bundle=bundle, created_at=now,
                  expires_at=now + duration, reason=reason, granted_by=granted_by)
        with self._lock:
            self._grants[g.id] = g
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
        with self._lock:
            return sorted(self._grants.values(), key=lambda g: g.created_at)

    # -- delegations ----------------------------------------------------------------

    def add_delegation(self, *, user: str, uid: int, agent: str, audiences: frozenset[str],
                       scopes: frozenset[str], duration: int, reason: str) -> Delegation:
        now = self._clock()
        d = Delegation(id="d-" + secrets.token_urlsafe(12), user=user, uid=uid, agent=agent,
                       audiences=audiences, scopes=scopes, created_at=now,
                       expires_at=now + duration, reason=reason)
        with self._lock:
            self._delegations[d.id] = d
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
        with self._lock:
            return dict(self._delegations)
