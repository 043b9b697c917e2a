"""``badged recover``: the operator's answer when start-up refuses.

The daemon never destroys a key the registry does not name and never cuts
audit history a checkpoint had sealed; it refuses to start and says why.
This command, run with the daemon stopped (it takes the same state-dir
lock), does what the operator decides, every step audited:

* ``--adopt``: rebuild registry entries from the token's key labels
  (``badged/agent/NAME/vN/tok|sig``) and the audit log (creation time,
  description, whether the agent was revoked, whether the key's kid was
  ever audited). The newest complete version of each agent is adopted;
  older versions, half pairs and revoked agents' keys are quarantined.
* ``--quarantine``: relabel every unregistered agent key to
  ``badged/quarantine/...``: out of reach of the daemon, still in the token.
* ``--audit-move-aside SEQ``: cut a damaged audit record that a checkpoint
  had sealed, and everything after it, into a ``.cut-`` file, with a
  recovery record saying the operator did it (``verify`` keeps failing on it:
  sealed history was lost).
* ``--purge-quarantine``: destroy quarantined keys (each destruction audited).

A corrupt registry file is moved aside (``agents.json.corrupt-TIME``, audited)
before ``--adopt``/``--quarantine`` rebuild it. Without a flag the command
only reports what start-up would find.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

from badged.audit.log import AuditConfig, AuditLog
from badged.audit.reader import find_marked, iter_records
from badged.config import DaemonConfig
from badged.errors import BadgedError, ConfigError, KeyNotFoundError
from badged.fsutil import ensure_private_dir, lock_state_dir
from badged.identity.registry import (
    AGENT_KEY_PREFIX,
    QUARANTINE_PREFIX,
    AgentRegistry,
    ReconcileReport,
    UnregisteredKeysError,
)
from badged.identity.store import AgentStore
from badged.keystore import open_keystore
from badged.keystore.port import KeyStore

MODES = ("adopt", "quarantine")


@dataclass
class RecoverResult:
    """What was done, for the command's output and for tests."""

    report: ReconcileReport = field(default_factory=ReconcileReport)
    registry_moved_to: str | None = None
    purged: list[str] = field(default_factory=list)
    unregistered: list[str] = field(default_factory=list)
    audit_moved_aside: int | None = None

    def lines(self) -> list[str]:
        r = self.report
        out = []
        if self.audit_moved_aside is not None:
            out.append(f"audit: records from seq {self.audit_moved_aside} moved aside (audited)")
        if self.registry_moved_to:
            out.append(f"registry: corrupt file moved to {self.registry_moved_to}")
        if r.recovered_op:
            out.append(f"registry: interrupted change {r.recovered_op} resolved")
        out += [f"adopted: {k}" for k in r.adopted]
        out += [f"quarantined: {k} -> {v}" for k, v in r.quarantined.items()]
        out += [f"destroyed (retired in the registry): {k}" for k in r.destroyed]
        out += [f"purged from quarantine: {k}" for k in self.purged]
        out += [f"MISSING from the token (agent cannot sign): {k}" for k in r.missing]
        out += [f"unregistered (start-up will refuse): {k}" for k in self.unregistered]
        return out or ["nothing to do: token, registry and audit log agree"]


def recover(config: DaemonConfig, *, mode: str | None = None, audit_move_aside: int | None = None,
            purge_quarantine: bool = False, keystore: KeyStore | None = None,
            state_lock_fd: int = -1) -> RecoverResult:
    """Run the recovery the operator chose. Raises BadgedError with a clear reason.

    ``state_lock_fd``: the state-dir lock when the caller holds it already
    (``badged dev``'s prepare takes it); else it is taken here.
    """
    from badged.keystore.port import DEVICE_KEY

    if mode is not None and mode not in MODES:
        raise ConfigError(f"unknown recover mode {mode!r}")
    if not config.state_dir.exists():
        raise ConfigError("state dir does not exist", path=str(config.state_dir))
    ensure_private_dir(config.private_dir)
    lock_fd = state_lock_fd if state_lock_fd >= 0 else lock_state_dir(config)
    result = RecoverResult(audit_moved_aside=audit_move_aside)
    audit: AuditLog | None = None
    ks = keystore
    try:
        if ks is None:
            ks = open_keystore(config.backend, config.keystore)
        try:
            device = ks.get(DEVICE_KEY)
            device_created = False
        except KeyNotFoundError:
            device, device_created = ks.generate(DEVICE_KEY), True
        audit = AuditLog.open(AuditConfig(directory=config.effective_audit_dir),
                              signer=device, move_aside_sealed=audit_move_aside)
        audit.append_sync({"event": "recover.started", "pid": os.getpid(),
                           "mode": mode or "report", "audit_move_aside": audit_move_aside,
                           "purge_quarantine": purge_quarantine, "config": config.source})
        if device_created:
            audit.append_sync({"event": "key.created", "key": DEVICE_KEY, "reason": "device key"})
        store = AgentStore(config.private_dir / "agents.json")
        try:
            store.load()
        except ConfigError as exc:
            if mode is None:
                raise
            moved = store.move_aside(f"corrupt-{int(time.time())}")
            result.registry_moved_to = str(moved)
            audit.append_sync({"event": "registry.moved_aside", "file": str(store.path),
                               "moved_to": str(moved), "reason": str(exc)[:500]})
        registry = AgentRegistry(store=store, keystore=ks, clock=time.time,
                                 trust_domain=config.trust_domain, max_token_ttl=config.max_ttl,
                                 audit=audit.append_sync)
        audit_dir = config.effective_audit_dir

        def find_op(op: str) -> set[str]:
            return {str(r.get("event")) for r in find_marked(audit_dir, op) if r.get("op") == op}

        try:
            history = list(iter_records(audit_dir, events=["agent.", "registry.recovered"])) \
                if mode == "adopt" else []
            result.report = registry.reconcile(find_op, orphans=mode or "refuse",
                                               history=history)
        except UnregisteredKeysError as exc:
            result.unregistered = exc.keys
        if purge_quarantine:
            for key in [k for k in ks.list() if k.startswith(QUARANTINE_PREFIX)]:
                audit.append_sync({"event": "key.destroyed", "key": key,
                                   "reason": "operator: badged recover --purge-quarantine"})
                ks.destroy(key)
                result.purged.append(key)
        left = [k for k in ks.list() if k.startswith(AGENT_KEY_PREFIX)]
        audit.append_sync({"event": "recover.done", "adopted": len(result.report.adopted),
                           "quarantined": len(result.report.quarantined),
                           "purged": len(result.purged),
                           "unregistered": len(result.unregistered), "agent_keys": len(left)})
    finally:
        if audit is not None:
            with contextlib.suppress(BadgedError, OSError):
                audit.close()
        if ks is not None and keystore is None:
            with contextlib.suppress(BadgedError, OSError):
                ks.close()
        if state_lock_fd < 0:
            os.close(lock_fd)
    return result
