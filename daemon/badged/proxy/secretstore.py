"""Static secrets for the credential proxy: sealed in the token, usable, never readable.

An API key that a SaaS API takes as is cannot be replaced by a badged token,
so badged keeps it for the agent and attaches it to the agent's calls
(``credential = "secret"`` routes, docs/proxy.md). At rest it is sealed with
AES-256-GCM under a key created in, and never leaving, the token
(:class:`~badged.keystore.port.SecretSealer`); the additional data names the
secret and its version, so a blob copied onto another name does not open.
The file holds only the blobs; ``reveal`` unseals at use, inside the daemon,
for one call. No RPC returns a value (``badgectl secret`` can set, rotate
and delete, and list names and versions).

Changes follow the registry's order (badged.identity.registry): the new
state is written durably, then audited, then swapped in; a change whose
audit record fails is undone on disk and never takes effect. The audit
record names the secret and its version, never the value or a hash of it (an
API key can be short enough to guess from its hash).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from badged.core.clock import Clock
from badged.errors import (
    AlreadyExistsError,
    ConfigError,
    FailedPreconditionError,
    InvalidRequestError,
    NotFoundError,
)
from badged.fsutil import atomic_write
from badged.keystore.port import KeyStore, SecretSealer

_logger = logging.getLogger(__name__)

SEAL_KEY = "badged/proxy/secrets/v1"
MAX_VALUE = 8192
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# A value goes into an HTTP header: visible ASCII and spaces only (no CR/LF).
_VALUE_RE = re.compile(rb"^[\x20-\x7e]+$")

AuditFn = Callable[[Mapping[str, Any]], Awaitable[object]]
Runner = Callable[[Callable[[], bytes]], Awaitable[bytes]]


@dataclass(frozen=True)
class SecretEntry:
    name: str
    version: int
    sealed: bytes
    created_at: int
    updated_at: int


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InvalidRequestError(f"invalid secret name {name[:70]!r}",
                                  public="secret name must match [a-z0-9][a-z0-9._-]{0,62}")
    return name


def _aad(name: str, version: int) -> bytes:
    return f"badged-proxy-secret-v1\x00{name}\x00{version}".encode()


class SecretStore:
    """The sealed secrets of this daemon (``private/proxy-secrets.json``)."""

    def __init__(self, path: Path, keystore: KeyStore, *, clock: Clock) -> None:
        self._path = path
        self._keystore = keystore
        self._clock = clock
        self._lock = asyncio.Lock()
        self._entries: dict[str, SecretEntry] = self._load()

    @property
    def _sealer(self) -> SecretSealer:
        ks = self._keystore
        if not isinstance(ks, SecretSealer):
            raise FailedPreconditionError(
                f"the {ks.backend} key store cannot seal secrets",
                public=f"static secrets need a key store that can seal them "
                       f"({ks.backend} cannot yet; see docs/proxy.md)")
        return ks

    # -- reading -----------------------------------------------------------------------

    def _load(self) -> dict[str, SecretEntry]:
        """Refuses the start on a corrupt file (nothing is changed or guessed)."""
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read secrets: {exc.strerror}", path=str(self._path)) \
                from None
        try:
            doc = json.loads(raw)
            if doc.get("version") != 1:
                raise ValueError("unknown format version")
            out = {}
            for name, e in doc["secrets"].items():
                out[check_name(name)] = SecretEntry(
                    name, int(e["version"]), base64.b64decode(e["sealed"], validate=True),
                    int(e["created_at"]), int(e["updated_at"]))
            return out
        except (ValueError, KeyError, TypeError, AttributeError, InvalidRequestError) as exc:
            raise ConfigError(f"corrupt secrets file: {exc}", path=str(self._path)) from None

    def list(self) -> list[SecretEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def reveal(self, name: str) -> bytes:
        """Unseal ``name`` now, for one use (the proxy's mint function)."""
        entry = self._entries.get(name)
        if entry is None:
            raise NotFoundError(f"secret {name!r} is not set",
                                public="the route's secret is not set")
        return self._sealer.unseal(SEAL_KEY, entry.sealed, _aad(name, entry.version))

    # -- changing (durable, audited, then swapped in) ----------------------------------

    async def set(self, name: str, value: bytes, *, rotate: bool, caller: Mapping[str, object],
                  audit: AuditFn, run: Runner) -> SecretEntry:
        check_name(name)
        if not 0 < len(value) <= MAX_VALUE or not _VALUE_RE.match(value):
            raise InvalidRequestError(
                "secret value refused",
                public=f"secret value must be 1-{MAX_VALUE} printable ASCII characters "
                       f"(it is sent in an HTTP header)")
        sealer = self._sealer
        async with self._lock:
            old = self._entries.get(name)
            if rotate and old is None:
                raise NotFoundError(f"secret {name!r} is not set",
                                    public="no such secret (use set to create it)")
            if not rotate and old is not None:
                raise AlreadyExistsError(f"secret {name!r} exists",
                                         public="secret exists (use rotate to replace it)")
            version = old.version + 1 if old is not None else 1
            now = int(self._clock())
            # Sealing is a token call: where hardware calls run (off the loop on a TPM).
            sealed = await run(lambda: sealer.seal(SEAL_KEY, value, _aad(name, version)))
            entry = SecretEntry(name, version, sealed, old.created_at if old else now, now)
            new = dict(self._entries)
            new[name] = entry
            await self._commit(new, {"event": "secret.rotated" if rotate else "secret.set",
                                     "secret": {"name": name, "version": version},
                                     "caller": dict(caller)}, audit)
            return entry

    async def delete(self, name: str, *, caller: Mapping[str, object],
                     audit: AuditFn) -> SecretEntry:
        check_name(name)
        async with self._lock:
            old = self._entries.get(name)
            if old is None:
                raise NotFoundError(f"secret {name!r} is not set", public="no such secret")
            new = dict(self._entries)
            del new[name]
            await self._commit(new, {"event": "secret.deleted",
                                     "secret": {"name": name, "version": old.version},
                                     "caller": dict(caller)}, audit)
            return old

    async def _commit(self, new: dict[str, SecretEntry], record: dict[str, Any],
                      audit: AuditFn) -> None:
        self._save(new)
        try:
            await audit({**record, "agent": None, "decision": "allow"})
        except BaseException:
            # Not audited: must not take effect. Put the old file back.
            try:
                self._save(self._entries)
            except OSError:
                _logger.error("secret change saved but not audited, and the old file could "
                              "not be restored", extra={"event": record["event"]})
            raise
        self._entries = new

    def _save(self, entries: Mapping[str, SecretEntry]) -> None:
        doc = {"version": 1, "secrets": {
            e.name: {"version": e.version, "sealed": base64.b64encode(e.sealed).decode(),
                     "created_at": e.created_at, "updated_at": e.updated_at}
            for e in entries.values()}}
        atomic_write(self._path, json.dumps(doc, indent=1, sort_keys=True).encode(), mode=0o600)


__all__ = ["SEAL_KEY", "SecretEntry", "SecretStore", "check_name"]
