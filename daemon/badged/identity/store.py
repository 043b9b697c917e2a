"""Agent identity metadata, persisted as one small JSON file (mode 0600).

Keys live in the token; everything the token cannot hold (status, versions,
published public JWKs of retired keys) lives here. The file is replaced
atomically on every change, so a crash never leaves a half-written registry.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from badged.errors import ConfigError
from badged.fsutil import atomic_write

SCHEMA = 1


@dataclass
class KeyVersion:
    version: int
    token_key: str
    sign_key: str
    token_kid: str
    sign_kid: str
    token_jwk: dict[str, str]
    sign_jwk: dict[str, str]
    created_at: int
    state: str = "active"  # active | retired
    retired_at: int = 0
    publish_until: int = 0


@dataclass
class AgentRecord:
    name: str
    spiffe_id: str
    created_at: int
    description: str = ""
    status: str = "active"  # active | revoked
    revoked_at: int = 0
    revoke_reason: str = ""
    versions: list[KeyVersion] = field(default_factory=list)

    @property
    def current(self) -> KeyVersion:
        for v in reversed(self.versions):
            if v.state == "active":
                return v
        raise LookupError(self.name)


class AgentStore:
    """Load/save the registry file. Not thread-safe: the registry serializes."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def load(self) -> dict[str, AgentRecord]:
        if not self._path.exists():
            return {}
        try:
            raw = json.loads(self._path.read_text())
            if raw.get("schema") != SCHEMA:
                raise ValueError(f"unknown schema {raw.get('schema')!r}")
            agents: dict[str, AgentRecord] = {}
            for item in raw["agents"]:
                versions = [KeyVersion(**v) for v in item.pop("versions")]
                rec = AgentRecord(**item, versions=versions)
                agents[rec.name] = rec
            return agents
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"agent registry is corrupt: {exc}", path=str(self._path)) from None

    def save(self, agents: dict[str, AgentRecord]) -> None:
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "agents": [asdict(a) for a in sorted(agents.values(), key=lambda a: a.name)],
        }
        atomic_write(self._path, json.dumps(doc, indent=1, sort_keys=True).encode())
