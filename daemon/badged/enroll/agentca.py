"""The enrolled device as a tiny CA for its own agents.

Agent certificates are short-lived (default 1 h) and re-issued on demand
once half their lifetime has passed ("renewed automatically" without a
timer: a caller asking for its certificate always gets one with at least
half its life left). Revocation and rotation show up in the CRL, computed
from the registry rather than recorded as events, so a revoke done by any
code path (admin RPC, a crash-swept reconcile) is reflected without hooks:

* agent revoked or deleted → its unexpired certificates, reason
  ``cessationOfOperation``;
* key rotated → certificates of the retired key, reason ``superseded``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from badged.core.x509 import (
    AgentCertRequest,
    RevokedSerial,
    agent_certificate,
    agent_crl,
    permitted_agents,
    to_pem,
)
from badged.enroll.store import EnrollmentStore, IssuedCert
from badged.errors import BadgedError, FailedPreconditionError
from badged.identity.registry import AgentRegistry, SigningKey
from badged.keystore.port import KeyHandle

_logger = logging.getLogger(__name__)

DEFAULT_CERT_TTL = 3600
CRL_LIFETIME = 3600


@dataclass(frozen=True)
class CrlSnapshot:
    pem: str
    revoked: frozenset[int]
    produced_at: float


class AgentCertificateAuthority:
    def __init__(self, store: EnrollmentStore, *, device_key: KeyHandle,
                 cert_ttl: int = DEFAULT_CERT_TTL) -> None:
        self._store = store
        self._device_key = device_key
        self._ttl = cert_ttl
        self._lock = threading.Lock()
        self._crl: CrlSnapshot | None = None
        self._crl_number = 0

    def current(self, key: SigningKey, now: float) -> IssuedCert | None:
        """A certificate for this exact key with at least half its life left."""
        best = None
        for c in self._store.issued():
            if c.agent != key.agent or c.kid != key.kid:
                continue
            if c.not_after - now < (c.not_after - c.not_before) / 2:
                continue
            if best is None or c.not_after > best.not_after:
                best = c
        return best

    def issue(self, key: SigningKey, chain: Sequence[x509.Certificate], now: float) -> IssuedCert:
        """Issue for an agent the device certificate covers; refuse the others
        rather than mint a certificate every relying party would refuse."""
        permitted = permitted_agents(chain[0])
        if permitted is not None and key.agent not in permitted:
            raise FailedPreconditionError(
                f"agent {key.agent} is not among the agents the device was enrolled for",
                public="this agent is not in the device's enrollment: re-enroll the device "
                       "with it (badgectl ca sign --agent)")
        cert = agent_certificate(
            device_key=self._device_key, device_cert=chain[0], now=now,
            request=AgentCertRequest(spiffe_id=key.spiffe_id, agent=key.agent,
                                     public_key=key.handle.public_key(),
                                     serial=x509.random_serial_number(), ttl_seconds=self._ttl))
        issued = IssuedCert(serial=cert.serial_number, agent=key.agent, kid=key.kid,
                            version=key.version,
                            not_before=int(cert.not_valid_before_utc.timestamp()),
                            not_after=int(cert.not_valid_after_utc.timestamp()), pem=to_pem(cert))
        self._store.record(issued, now=int(now))
        return issued

    def revoked(self, agents: AgentRegistry, now: float) -> list[RevokedSerial]:
        out: list[RevokedSerial] = []
        for c in self._store.issued():
            if c.not_after < now:
                continue
            try:
                rec = agents.get(c.agent)
            except BadgedError:
                out.append(RevokedSerial(c.serial, int(now),
                                         x509.ReasonFlags.cessation_of_operation))
                continue
            if rec.status != "active":
                out.append(RevokedSerial(c.serial, rec.revoked_at or int(now),
                                         x509.ReasonFlags.cessation_of_operation))
            elif c.kid != rec.current.token_kid:
                retired = next((v.retired_at for v in rec.versions if v.token_kid == c.kid), 0)
                out.append(RevokedSerial(c.serial, retired or int(now),
                                         x509.ReasonFlags.superseded))
        return out

    def crl(self, agents: AgentRegistry, chain: Sequence[x509.Certificate], now: float) -> str:
        """The current CRL; re-signed when its content changes or it is half-way stale."""
        revoked = self.revoked(agents, now)
        serials = frozenset(r.serial for r in revoked)
        with self._lock:
            snap = self._crl
            if snap is not None and snap.revoked == serials \
                    and now - snap.produced_at < CRL_LIFETIME / 2:
                return snap.pem
            self._crl_number = max(self._crl_number + 1, int(now))
            crl = agent_crl(device_key=self._device_key, device_cert=chain[0], revoked=revoked,
                            now=now, next_update_seconds=CRL_LIFETIME, number=self._crl_number)
            self._crl = CrlSnapshot(to_pem(crl), serials, now)
            return self._crl.pem
