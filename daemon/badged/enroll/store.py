"""Enrollment state on disk: the device chain and the agent certificates issued.

Lives in ``state_dir/private/enroll`` (0700, files 0600, atomic writes).
Nothing here is secret -- certificates are public -- but it is integrity
relevant: a swapped chain would make the device present someone else's
identity, so it sits with the rest of the private state.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509

from badged.core.x509 import load_pem_chain, to_pem
from badged.errors import ConfigError
from badged.fsutil import atomic_write, ensure_private_dir

_logger = logging.getLogger(__name__)


@dataclass
class IssuedCert:
    serial: int
    agent: str
    kid: str
    version: int
    not_before: int
    not_after: int
    pem: str


class EnrollmentStore:
    """Device chain + index of issued agent certificates. Thread-safe."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = state_dir / "private" / "enroll"
        self._lock = threading.RLock()
        self._chain_cache: tuple[tuple[int, int], list[x509.Certificate]] | None = None
        self._issued: dict[int, IssuedCert] | None = None

    @property
    def directory(self) -> Path:
        return self._dir

    def _ensure(self) -> None:
        ensure_private_dir(self._dir)

    # -- device chain ------------------------------------------------------------

    def device_chain(self) -> list[x509.Certificate] | None:
        """The installed chain (device cert first), re-read when the file changes."""
        path = self._dir / "device-chain.pem"
        with self._lock:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            key = (st.st_mtime_ns, st.st_size)
            if self._chain_cache is not None and self._chain_cache[0] == key:
                return list(self._chain_cache[1])
            try:
                chain = load_pem_chain(path.read_bytes())
            except ValueError:
                raise ConfigError("device chain is not valid PEM", path=str(path)) from None
            self._chain_cache = (key, chain)
            return list(chain)

    def save_device_chain(self, chain: list[x509.Certificate]) -> None:
        with self._lock:
            self._ensure()
            atomic_write(self._dir / "device-chain.pem",
                         "".join(to_pem(c) for c in chain).encode("ascii"))
            self._chain_cache = None

    # -- issued agent certificates -------------------------------------------------

    def _load_issued(self) -> dict[int, IssuedCert]:
        if self._issued is None:
            path = self._dir / "issued.json"
            try:
                raw = json.loads(path.read_text())
            except FileNotFoundError:
                raw = []
            except (OSError, ValueError):
                raise ConfigError("issued certificate index is unreadable", path=str(path)) from None
            self._issued = {int(r["serial"]): IssuedCert(**r) for r in raw}
        return self._issued

    def issued(self) -> list[IssuedCert]:
        with self._lock:
            return list(self._load_issued().values())

    def record(self, cert: IssuedCert, *, now: int) -> None:
        """Add ``cert`` and drop entries that expired (nothing left to revoke)."""
        with self._lock:
            self._ensure()
            issued = self._load_issued()
            issued[cert.serial] = cert
            for serial in [s for s, c in issued.items() if c.not_after < now]:
                del issued[serial]
            atomic_write(self._dir / "issued.json",
                         json.dumps([asdict(c) for c in issued.values()], indent=1).encode())
