"""Assurance levels of agent identities, computed from verified facts.

Following the agent-identity tiers:

* ``foundation``: a unique cryptographic identity whose key lives in a token
  (every badged agent: keys are generated non-extractable in the token);
* ``enterprise``: plus an X.509 certificate with lifecycle under the
  organization root -- the device holds a valid certificate chain from the
  operator CA (checked at import) that covers this agent (its name
  constraints), so the agent's certificates chain to the root and are
  revocable there;
* ``advanced``: plus hardware-bound keys with verified attestation -- the CA
  wrote ``tpm2-activated-ak`` into the device certificate (it verified a
  TPM2_Certify by an AK that completed credential activation against the
  pinned EK CA), that AK is this daemon's own TPM AK, and the agent's keys
  live in that TPM. No PKCS#11 token here offers vendor attestation, so a
  PKCS#11 agent tops out at ``enterprise``.

Nothing here is configured: the inputs are the installed chain, the CA's
statement inside it and the key store itself. Cached per installed chain
(the AK check costs one TPM call).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

from cryptography import x509

from badged.core.tpm_evidence import tpm_name
from badged.core.x509 import device_attestation, permitted_agents
from badged.enroll.activation import CredentialActivator
from badged.enroll.store import EnrollmentStore
from badged.errors import BadgedError
from badged.keystore.port import KeyStore

_logger = logging.getLogger(__name__)

FOUNDATION = "foundation"
ENTERPRISE = "enterprise"
ADVANCED = "advanced"
LEVELS = (FOUNDATION, ENTERPRISE, ADVANCED)
CLAIM = "assurance"
"""The access-token claim that carries the level."""
EVIDENCE_TPM_ACTIVATED = "tpm2-activated-ak"
RECHECK_SECONDS = 1.0
"""How stale the chain facts may be: a token is minted per call, and a stat of
the chain file per token would cost more than the rest of the lookup; an
import or a replaced chain shows within a second."""


def rank(level: str) -> int:
    """Order of the levels; unknown strings rank below foundation."""
    return LEVELS.index(level) if level in LEVELS else -1


@dataclass(frozen=True)
class DeviceFacts:
    """What the device's installed chain establishes (and what it does not)."""

    enrolled: bool
    not_after: float = 0.0
    permitted: frozenset[str] | None = None
    evidence: str = ""
    hardware_attested: bool = False


class AssuranceOracle:
    """Levels for the agents of one daemon; thread-safe (tokens are minted off-loop)."""

    def __init__(self, store: EnrollmentStore, keystore: KeyStore) -> None:
        self._store = store
        self._keystore = keystore
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, bytes], DeviceFacts] | None = None
        self._checked = float("-inf")  # monotonic time of the last look at the chain
        self._ak_name: str | None = None  # this TPM's AK Name (hex), read once

    def hardware_pending(self) -> bool:
        """Could :meth:`facts` still read the TPM (the AK, once per daemon)?

        Async callers that are not on the signing thread then call it through
        ``asyncio.to_thread``: never on the loop, and never queued behind a
        slow signature on the signing thread.
        """
        return self._ak_name is None and isinstance(self._keystore, CredentialActivator)

    def _ak(self) -> str | None:
        if self._ak_name is None and isinstance(self._keystore, CredentialActivator):
            try:
                self._ak_name = tpm_name(self._keystore.ak_public()).hex()
            except BadgedError as exc:
                _logger.warning("cannot read the AK to confirm the attested TPM: %s", exc)
        return self._ak_name

    def facts(self) -> DeviceFacts:
        cache = self._cache
        if cache is not None and time.monotonic() - self._checked < RECHECK_SECONDS:
            return cache[1]
        try:
            chain = self._store.device_chain()
        except BadgedError:
            chain = None
        if not chain:
            facts = DeviceFacts(enrolled=False)
            with self._lock:
                self._cache, self._checked = ((0, b""), facts), time.monotonic()
            return facts
        leaf = chain[0]
        ident = (leaf.serial_number, leaf.signature)
        if cache is not None and cache[0] == ident:
            self._checked = time.monotonic()
            return cache[1]
        facts = self._compute(leaf)
        with self._lock:
            self._cache, self._checked = (ident, facts), time.monotonic()
        return facts

    def _compute(self, leaf: x509.Certificate) -> DeviceFacts:
        evidence, ak_name = "", ""
        raw = device_attestation(leaf)
        if raw is not None:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                evidence = str(doc.get("evidence", ""))
                ak_name = str(doc.get("ak_name", ""))
        hardware = False
        if evidence == EVIDENCE_TPM_ACTIVATED and isinstance(self._keystore, CredentialActivator):
            own = self._ak()
            hardware = own is not None and own == ak_name
            if not hardware:
                _logger.warning("device certificate does not name this TPM's AK: not advanced")
        return DeviceFacts(enrolled=True, not_after=leaf.not_valid_after_utc.timestamp(),
                           permitted=permitted_agents(leaf), evidence=evidence,
                           hardware_attested=hardware)

    def level(self, agent: str, now: float) -> str:
        facts = self.facts()
        if not facts.enrolled or facts.not_after <= now:
            return FOUNDATION
        if facts.permitted is not None and agent not in facts.permitted:
            return FOUNDATION  # no certificate this device may issue for it
        return ADVANCED if facts.hardware_attested else ENTERPRISE
