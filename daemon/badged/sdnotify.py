"""systemd's readiness protocol (sd_notify), without libsystemd.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a Unix datagram
socket; the service sends ``READY=1`` once it serves and ``STOPPING=1`` when
it begins to shut down. That is a few lines of socket code, so no dependency:
https://www.freedesktop.org/software/systemd/man/sd_notify.html
"""

from __future__ import annotations

import logging
import os
import socket

_logger = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) if run under systemd.

    Returns whether a message was sent. Failures are logged, never raised: a
    daemon must not die because its supervisor's socket went away.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        _logger.warning("NOTIFY_SOCKET is neither a path nor abstract; ignored")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        _logger.warning("sd_notify failed", extra={"error": exc.strerror or str(exc)})
        return False
    return True
