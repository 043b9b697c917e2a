"""Tamper-evident, crash-safe audit log of every decision the daemon makes.

Usage::

    from badged.audit import AuditConfig, AuditLog, verify

    log = AuditLog.open(AuditConfig(directory=audit_dir), signer=device_key)
    receipt = await log.append({"event": "token.issued", "agent": "deploy-bot",
                                "decision": "allow", "jti": jti,
                                "credential_sha256": digest})
    await log.aclose()

    report = verify(audit_dir, device_key.public_key())
    assert report.ok, report.first_bad

Modules: :mod:`~badged.audit.record` (format, no I/O), :mod:`~badged.audit.log`
(the writer), :mod:`~badged.audit.verify` (offline check),
:mod:`~badged.audit.reader` (tail/follow/export), :mod:`~badged.audit.files`
(on-disk layout). ``docs/audit.md`` explains what verification proves.
"""

from badged.audit.log import AuditConfig, AuditLog, AuditReceipt, AuditStats
from badged.audit.reader import export, follow, iter_records, tail
from badged.audit.record import FORBIDDEN_FIELDS, RESERVED_FIELDS, RecordError, key_id
from badged.audit.verify import BadRecord, VerifyReport, verify

__all__ = [
    "FORBIDDEN_FIELDS",
    "RESERVED_FIELDS",
    "AuditConfig",
    "AuditLog",
    "AuditReceipt",
    "AuditStats",
    "BadRecord",
    "RecordError",
    "VerifyReport",
    "export",
    "follow",
    "iter_records",
    "key_id",
    "tail",
    "verify",
]
