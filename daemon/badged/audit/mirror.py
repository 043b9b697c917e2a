"""Best-effort copies of audit records to syslog / the systemd journal.

Usage::

    log = AuditLog.open(config, signer=key, mirror=syslog_mirror())

Why a copy at all: the on-host log can be truncated by someone with disk
access, and truncation of the unsealed tail is undetectable offline (see
docs/audit.md). A copy that leaves the host through syslog forwarding or
journald's remote upload is the cheapest external anchor. It is a *copy*:
it runs after the record is durable, on its own thread, and its failures are
only logged -- the file stays the record of truth.
"""

from __future__ import annotations

import logging
import syslog
from collections.abc import Callable

_logger = logging.getLogger(__name__)

MAX_MESSAGE = 8000
"""Longer records are cut (and marked) so a syslog relay does not drop them."""


def syslog_mirror(ident: str = "badged-audit",
                  facility: int = syslog.LOG_AUTHPRIV) -> Callable[[bytes], None]:
    """A mirror function writing one syslog message per record (journald reads /dev/log).

    ``LOG_AUTHPRIV`` because records name users and processes: most systems
    keep that facility readable by root only.
    """
    syslog.openlog(ident, syslog.LOG_PID, facility)

    def send(batch: bytes) -> None:
        for line in batch.splitlines():
            text = line.decode("ascii", "replace")
            if len(text) > MAX_MESSAGE:
                text = text[:MAX_MESSAGE] + "...(truncated)"
            syslog.syslog(syslog.LOG_INFO, text)

    return send
