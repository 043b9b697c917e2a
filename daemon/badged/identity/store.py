"""Agent identity metadata, persisted as one small JSON file (mode 0600).

Keys live in the token; everything the token cannot hold (status, versions,
published public JWKs of retired keys) lives here. The file is replaced
atomically on every change (temp file, fsync, rename, directory fsync), so a
crash never leaves a half-written registry.

Next to it, ``agents.pending.json`` names the one registry change in flight
(written durably *before* its audit intent record and before any key is
made, removed once the change is complete). After a crash it tells start-up
which change to finish or undo, without reading the whole audit log.
"""

from __future__ import annotations

import contextlib
import json
import os
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
    # The SSH purpose key (badged.sshagent): a third key per version, made only
    # while the SSH agent socket is enabled; "" for versions made without it.
    ssh_key: str = ""
    ssh_jwk: dict[str, str] = field(default_factory=dict)


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
        # name -> (the record object, its encoded fragment): see save().
        self._encoded: dict[str, tuple[AgentRecord, str]] = {}

    @property
    def path(self) -> Path:
        return self._path

    @property
    def pending_path(self) -> Path:
        return self._path.with_name(self._path.stem + ".pending.json")

    def exists(self) -> bool:
        return self._path.exists()

    def load(self) -> dict[str, AgentRecord]:
        """The registry; ``{}`` when there is no file (the caller decides if that is OK)."""
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
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"agent registry is corrupt ({exc}); nothing was changed. Restore it from a "
                "backup, or run 'badged recover' to rebuild it from the token and the audit log",
                path=str(self._path)) from None
        except OSError as exc:
            raise ConfigError(f"agent registry unreadable: {exc.strerror}",
                              path=str(self._path)) from None

    def save(self, agents: dict[str, AgentRecord]) -> None:
        """Durably replace the file. Raises OSError; the old file is then intact.

        The file is the same bytes ``json.dumps(doc, indent=1, sort_keys=True)``
        writes, assembled from one encoded fragment per agent. A fragment is
        reused while its record is the very object it was made from: the
        registry never changes a saved record in place (copy on write, see
        ``AgentRegistry._copy_with``), so only the records a change made are
        encoded. Encoding all 1,000 agents at each durable step made every
        creation slower than the last (issue 22).
        """
        fragments: list[str] = []
        cache: dict[str, tuple[AgentRecord, str]] = {}
        for name in sorted(agents):
            rec = agents[name]
            hit = self._encoded.get(name)
            if hit is None or hit[0] is not rec:
                hit = (rec, "  " + json.dumps(asdict(rec), indent=1, sort_keys=True)
                       .replace("\n", "\n  "))
            cache[name] = hit
            fragments.append(hit[1])
        body = ("[\n" + ",\n".join(fragments) + "\n ]") if fragments else "[]"
        text = '{\n "agents": ' + body + f',\n "schema": {SCHEMA}\n}}'
        try:
            atomic_write(self._path, text.encode())
        except OSError:
            # atomic_write's temp file (same naming): do not leave it behind.
            with contextlib.suppress(OSError):
                self._path.with_name(f".{self._path.name}.tmp-{os.getpid()}").unlink()
            raise
        self._encoded = cache

    def move_aside(self, suffix: str) -> Path | None:
        """Rename an unusable registry out of the way (kept as evidence)."""
        if not self._path.exists():
            return None
        dest = self._path.with_name(f"{self._path.name}.{suffix}")
        os.replace(self._path, dest)
        return dest

    # -- the change in flight ----------------------------------------------------

    def write_pending(self, op: dict[str, Any]) -> None:
        atomic_write(self.pending_path, json.dumps(op, sort_keys=True).encode())

    def read_pending(self) -> dict[str, Any] | None:
        try:
            raw = self.pending_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", path=str(self.pending_path)) from None
        try:
            op = json.loads(raw)
        except ValueError:
            op = None
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            # Torn only if written without atomic_write: treat as "unknown change".
            return {"op": "", "kind": "unknown", "agent": "", "keys": []}
        return op

    def clear_pending(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pending_path.unlink()
            dfd = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
