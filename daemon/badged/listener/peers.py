"""Kernel-attested peer credentials and the registry that hands them to handlers.

The front reads SO_PEERCRED and SO_PEERPIDFD from each accepted connection
and hands the resulting ``PeerCredentials`` object itself to every call on
that connection (``ServicerContext.caller``, read by
``badged.service.auth.caller_of``): no name is looked up, so the snapshot and
what later requests learn about it travel with the call. The registry below
only counts and names live connections (the name is what ``context.peer()``
returns, for logs); a call whose connection closed has no caller and is
unauthenticated.

At accept the front also fixes *which executable* the connecting process
runs (``ExeIdentity``: device, inode, size, ctime, mount namespace). The pid
is the kernel's word from ``connect()``, the executable is not: a process can
connect, fork, and ``execve`` a pinned binary while its child keeps talking
on the inherited socket. The attestor compares every request's
``/proc/PID/exe`` with this snapshot and, on a change, marks the connection
as having lost its identity for good (``PeerCredentials.lost``).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from dataclasses import dataclass, field

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux >= 6.5
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class ExeIdentity:
    """The file a process executes, as ``stat(/proc/PID/exe)`` saw it.

    ``(dev, ino)`` names the file; size and ctime are kept for the audit
    record and the hash cache (a rewrite in place changes ctime). ``mnt_ns``
    is the inode of ``/proc/PID/ns/mnt``: callers in another mount namespace
    see other files at the same paths (docs/threat-model.md).
    """

    dev: int
    ino: int
    size: int
    ctime_ns: int
    mnt_ns: int  # 0 when unreadable

    def same_file(self, dev: int, ino: int) -> bool:
        return self.dev == dev and self.ino == ino


class IdentityLoss:
    """Set once, never cleared: why a connection may no longer act as any agent.

    Lives beside the frozen credentials (one per accepted connection), so a
    later request on the same connection is refused even if the process
    execs back into the original binary.
    """

    __slots__ = ("reason",)

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


class PeerMemo:
    """Per-connection scratch the attestor keeps between requests (never identity).

    ``attested``: the inputs and the result of the last attestation, one
    tuple (replaced whole, so a reader on another thread never sees half of
    it), so an unchanged caller gets the very same attributes object back
    (and the selectors cached on it) instead of a fresh one per request;
    ``poller``: the pidfd's poll object, registered once. Dropped with the
    connection.
    """

    __slots__ = ("attested", "poller")

    def __init__(self) -> None:
        self.attested: tuple[object, object, object] | None = None
        self.poller: select.poll | None = None


@dataclass(frozen=True)
class PeerCredentials:
    """Who connected, as the kernel saw it at ``connect()`` time."""

    pid: int
    uid: int
    gid: int
    pidfd: int  # -1 when the kernel has no SO_PEERPIDFD
    start_time: int  # /proc/<pid>/stat starttime, the fallback against pid reuse
    channel: str  # "workload" | "admin": which public socket it came through
    # The executable at accept (None: unreadable, e.g. another uid's process
    # when the daemon lacks CAP_SYS_PTRACE). A credential built without a
    # snapshot gets None, and then any readable executable counts as changed:
    # forgetting the snapshot fails closed.
    exe: ExeIdentity | None = None
    lost: IdentityLoss = field(default_factory=IdentityLoss, compare=False, repr=False)
    memo: PeerMemo = field(default_factory=PeerMemo, compare=False, repr=False)

    def is_alive(self) -> bool:
        """True while the *same* process that connected is running.

        A pidfd becomes readable when its process exits (zombies included),
        and cannot be fooled by pid reuse. Without one we compare start times.
        """
        if self.pidfd >= 0:
            poller = self.memo.poller
            if poller is None:  # registered once per connection: one poll(2) per check
                poller = self.memo.poller = select.poll()
                poller.register(self.pidfd, select.POLLIN)
            try:
                return not poller.poll(0)
            except RuntimeError:  # in use on another thread right now: a poller of our own
                own = select.poll()
                own.register(self.pidfd, select.POLLIN)
                return not own.poll(0)
        return proc_start_time(self.pid) == self.start_time


def proc_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (after the parenthesised comm); -1 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return -1
    rest = data[data.rfind(b")") + 2:].split()
    return int(rest[19])


def exe_identity(pid: int) -> ExeIdentity | None:
    """What ``pid`` executes now; None when /proc does not tell us (gone, no access).

    A stat of the magic link and a readlink of the namespace file
    (docs/performance.md, "Cost of the caller checks").
    """
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return ExeIdentity(dev=st.st_dev, ino=st.st_ino, size=st.st_size, ctime_ns=st.st_ctime_ns,
                       mnt_ns=mount_namespace(pid))


def mount_namespace(pid: int) -> int:
    """The id of ``pid``'s mount namespace (``mnt:[ID]``); 0 when unreadable.

    readlink, not stat: stat of an nsfs file costs twice as much (measured).
    """
    try:
        link = os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return 0
    return int(link[link.index("[") + 1:-1]) if link.startswith("mnt:[") else 0


def peer_uid(sock: socket.socket) -> int:
    """Only the uid (SO_PEERCRED): enough to decide whether to admit a connection at all,
    before the dearer /proc reads of ``read_peer``."""
    return int(_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                             _UCRED.size))[1])


def read_peer(sock: socket.socket, channel: str) -> PeerCredentials:
    """Read the connecting process's credentials from an accepted socket.

    Runs in ``connection_made``, i.e. at accept: the executable snapshot is
    that of the process behind the connection *now*. A process that execs
    between ``connect()`` and our accept is attributed its post-exec binary
    (docs/threat-model.md, "exec after connect").
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pidfd = -1
    return PeerCredentials(pid=pid, uid=uid, gid=gid, pidfd=pidfd,
                           start_time=proc_start_time(pid), channel=channel,
                           exe=exe_identity(pid))


class PeerRegistry:
    """Connection name (what ``context.peer()`` returns) → peer credentials.

    Live connections per uid and by name, for limits, logs and tests; calls
    get their caller from the connection itself, not from here. Thread-safe.
    """

    def __init__(self) -> None:
        self._peers: dict[str, PeerCredentials] = {}
        self._per_uid: dict[int, int] = {}
        self._lock = threading.Lock()

    def register(self, address: str, peer: PeerCredentials) -> None:
        with self._lock:
            self._peers[address] = peer
            self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1

    def release(self, address: str) -> None:
        with self._lock:
            peer = self._peers.pop(address, None)
            if peer is None:
                return
            self._per_uid[peer.uid] -= 1
            if not self._per_uid[peer.uid]:
                del self._per_uid[peer.uid]
        if peer.pidfd >= 0:
            os.close(peer.pidfd)

    def lookup(self, grpc_peer: str) -> PeerCredentials | None:
        with self._lock:
            return self._peers.get(grpc_peer)

    def connections_of(self, uid: int) -> int:
        with self._lock:
            return self._per_uid.get(uid, 0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._peers)
