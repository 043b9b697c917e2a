"""Random identifiers for the issuance hot path: token ids (``jti``) and transaction ids.

Each issuance needs two (a ``jti`` and a ``txn``). ``secrets.token_urlsafe``
and ``os.urandom`` make one ``getrandom(2)`` system call each, plus a few
Python frames (``secrets`` → ``random.SystemRandom`` → ``os.urandom``, then
``base64``); on the reference VM that was ~2 % of the event loop's time per
call at 16 clients (docs/performance.md). Here the bytes come from the same
source, the kernel's CSPRNG, read 4 KiB at a time and handed out in slices:
one system call per ~180 ids. The bytes are exactly as unpredictable to
anyone outside the daemon as ``secrets``' (they are never reused, and
nothing else reads the pool); inside it, anyone who can read the daemon's
memory has its keys' handles anyway. A pool inherited through ``fork``
would hand the child the parent's next bytes, so a forked child starts with
an empty one (``os.register_at_fork``).
"""

from __future__ import annotations

import binascii
import os
import threading

_CHUNK = 4096
_URLSAFE = bytes.maketrans(b"+/", b"-_")


class _Pool:
    __slots__ = ("buf", "lock", "pos")

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0
        self.lock = threading.Lock()


_pool = _Pool()


def _take(n: int) -> bytes:
    pool = _pool
    with pool.lock:  # the signing thread (TPM) mints too
        pos = pool.pos
        end = pos + n
        if end > len(pool.buf):
            pool.buf = os.urandom(_CHUNK)
            pos, end = 0, n
        pool.pos = end
        return pool.buf[pos:end]


def new_jti() -> str:
    """A token id: 18 random bytes, base64url (24 characters, as ``token_urlsafe(18)``)."""
    return binascii.b2a_base64(_take(18), newline=False).translate(_URLSAFE).decode("ascii")


def new_txn() -> str:
    """A transaction id: 8 random bytes as 16 hex digits (no issuance count leaks)."""
    return _take(8).hex()


def _after_fork() -> None:
    """A child must never hand out the parent's remaining bytes again."""
    _pool.buf = b""
    _pool.pos = 0
    _pool.lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
