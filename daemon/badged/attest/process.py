"""Workload attestation: what the kernel says about the calling process.

Nothing here comes from the request. We read ``/proc/<pid>`` for the process
that connected, then confirm with its pidfd that the *same* process is still
alive -- so a caller that exited (and whose pid may already belong to someone
else) gets PERMISSION_DENIED instead of another process's attributes
(SPIRE's peertracker pattern: attest, then check liveness).

The executable is hashed through ``/proc/<pid>/exe``, i.e. the file actually
mapped, not a path the caller could swap; hashes are cached by
(dev, inode, size, mtime) so the hot path costs one ``fstat``.
"""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import pwd
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from badged.errors import AttestationError
from badged.listener.peers import PeerCredentials

_logger = logging.getLogger(__name__)

PARENT_LEVELS = 4
# Groups, cgroup and parent chain change rarely and cost ~8 /proc reads; they
# are re-read at most this often per process. The executable is re-read on
# every request (an exec must take effect at once).
SLOW_ATTRS_TTL = 1.0
_NAME_TTL = 60.0
_CONTAINER_RE = re.compile(r"(?:docker|libpod|cri-containerd|crio|containerd)[-/]([0-9a-f]{64})")
_BARE_ID_RE = re.compile(r"/([0-9a-f]{64})(?:\.scope)?$")


# unit_of/container_of are pure functions of a cgroup path, and a machine's
# callers share a handful of paths: parse each once, not on every request.
@lru_cache(maxsize=512)
def unit_of(cgroup: str | None) -> str | None:
    """The innermost systemd unit (``x.service`` / ``x.scope``) of a cgroup path."""
    if not cgroup:
        return None
    for part in reversed(cgroup.strip("/").split("/")):
        if part.endswith((".service", ".scope")) and not part.startswith("user@"):
            return part
    return None


@lru_cache(maxsize=512)
def container_of(cgroup: str | None) -> str | None:
    """A 64-hex container id from docker/podman/containerd cgroup paths."""
    if not cgroup:
        return None
    m = _CONTAINER_RE.search(cgroup) or _BARE_ID_RE.search(cgroup)
    return m.group(1) if m else None


@dataclass(frozen=True)
class ProcessAttributes:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    exe: str | None
    exe_sha256: str | None
    cgroup: str | None
    # Executables of the parent, grandparent, ... (read by ppid, *not*
    # pidfd-guarded: weaker evidence than the caller's own exe, see docs).
    chain: tuple[str, ...] = ()

    @property
    def unit(self) -> str | None:
        return unit_of(self.cgroup)

    @property
    def container_id(self) -> str | None:
        return container_of(self.cgroup)

    def selectors(self) -> frozenset[str]:
        """SPIRE-style unix selectors; exe selectors only when readable."""
        # Names are looked up (TTL-cached) on every call and are part of the
        # key, so a renamed user or group changes the selectors as before.
        return _selectors(self.uid, self.gid, self.groups, _user_name(self.uid),
                          _group_name(self.gid), self.exe, self.exe_sha256, self.cgroup,
                          self.chain)

    def summary(self) -> dict[str, object]:
        """For logs and audit: everything but nothing secret."""
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe,
                "exe_sha256": self.exe_sha256, "cgroup": self.cgroup, "unit": self.unit,
                "container_id": self.container_id, "chain": list(self.chain)}


# A pure function of the attributes: the same caller on every request gets the
# same frozenset instead of ~12 formatted strings and a set (~2 µs a call).
@lru_cache(maxsize=1024)
def _selectors(uid: int, gid: int, groups: tuple[int, ...], user: str | None,
               group: str | None, exe: str | None, exe_sha256: str | None,
               cgroup: str | None, chain: tuple[str, ...]) -> frozenset[str]:
    sels = {f"unix:uid:{uid}", f"unix:gid:{gid}"}
    for g in groups:
        sels.add(f"unix:supplementary_gid:{g}")
    if user:
        sels.add(f"unix:user:{user}")
    if group:
        sels.add(f"unix:group:{group}")
    if exe:
        sels.add(f"unix:path:{exe}")
    if exe_sha256:
        sels.add(f"unix:sha256:{exe_sha256}")
    if cgroup:
        # unit/container_id parse the cgroup path: once each, not twice.
        sels.add(f"unix:cgroup:{cgroup}")
        unit = unit_of(cgroup)
        if unit:
            sels.add(f"systemd:unit:{unit}")
        container = container_of(cgroup)
        if container:
            sels.add(f"container:id:{container}")
    if chain:
        sels.add(f"unix:parent_path:{chain[0]}")
        for p in chain:
            sels.add(f"unix:ancestor_path:{p}")
    return frozenset(sels)


class ProcessAttestor:
    """Reads /proc for a peer and guards the result with its pidfd."""

    def __init__(self, *, cache_size: int = 1024) -> None:
        self._hashes: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self._paths: OrderedDict[tuple[int, tuple[int, int, int, int]], str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # (pid, start_time) -> (read_at, groups, cgroup, chain)
        self._slow: OrderedDict[tuple[int, int], tuple[float, tuple[int, ...], str | None,
                                                       tuple[str, ...]]] = OrderedDict()

    def attest(self, peer: PeerCredentials) -> ProcessAttributes:
        exe, digest = self._exe(peer.pid)
        groups, cgroup, chain = self._slow_attrs(peer)
        # Everything above was read by pid; only now do we know it was *this*
        # process and not a successor that inherited the pid. One check, after
        # the reads, is what makes them trustworthy (a check before them would
        # only fail earlier, for one more poll() on every call).
        if not peer.is_alive():
            raise AttestationError(f"caller pid {peer.pid} exited before or during attestation")
        return ProcessAttributes(pid=peer.pid, uid=peer.uid, gid=peer.gid, groups=groups,
                                 exe=exe, exe_sha256=digest, cgroup=cgroup, chain=chain)

    def _groups(self, pid: int) -> tuple[int, ...]:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("Groups:"):
                        return tuple(sorted(int(g) for g in line.split()[1:]))
        except OSError:
            pass
        return ()

    def _slow_attrs(self, peer: PeerCredentials) -> tuple[tuple[int, ...], str | None,
                                                           tuple[str, ...]]:
        key = (peer.pid, peer.start_time)
        now = time.monotonic()
        with self._lock:
            hit = self._slow.get(key)
        if hit is not None and now - hit[0] < SLOW_ATTRS_TTL:
            return hit[1], hit[2], hit[3]
        value = (now, self._groups(peer.pid), self._cgroup(peer.pid), self._chain(peer.pid))
        with self._lock:
            self._slow[key] = value
            self._slow.move_to_end(key)
            while len(self._slow) > self._cache_size:
                self._slow.popitem(last=False)
        return value[1], value[2], value[3]

    def _chain(self, pid: int) -> tuple[str, ...]:
        chain: list[str] = []
        current = pid
        for _ in range(PARENT_LEVELS):
            current = _ppid(current)
            if current <= 1:
                break
            try:
                exe = os.readlink(f"/proc/{current}/exe")
            except OSError:
                break
            chain.append(exe.removesuffix(" (deleted)"))
        return tuple(chain)

    def _cgroup(self, pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/cgroup") as fh:
                for line in fh:
                    if line.startswith("0::"):
                        return line[3:].strip()
        except OSError:
            pass
        return None

    def _exe(self, pid: int) -> tuple[str | None, str | None]:
        # Hot path: one stat() through the magic link identifies the mapped
        # file (dev, inode, size, mtime); when that file was seen before, its
        # hash and this process's path are known and nothing else is read.
        # An exec changes the inode, so it is still noticed on the next call.
        try:
            st = os.stat(f"/proc/{pid}/exe")
        except OSError:
            # Another user's process without CAP_SYS_PTRACE: exe unknown, and
            # every exe-based selector fails closed.
            return None, None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            digest = self._hashes.get(key)
            path = self._paths.get((pid, key)) if digest is not None else None
        if digest is not None and path is not None:
            return path, digest
        try:
            path = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
            if digest is None:
                digest = self._hash_exe(pid, key)
        except OSError:
            return None, None
        if digest is None:  # the file changed under us: no identity
            return None, None
        with self._lock:
            self._paths[(pid, key)] = path
            while len(self._paths) > self._cache_size:
                self._paths.popitem(last=False)
        return path, digest

    def _hash_exe(self, pid: int, key: tuple[int, int, int, int]) -> str | None:
        fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != key:
                return None
            h = hashlib.sha256()
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
            digest = h.hexdigest()
        finally:
            os.close(fd)
        with self._lock:
            self._hashes[key] = digest
            while len(self._hashes) > self._cache_size:
                self._hashes.popitem(last=False)
        return digest


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return 0
    return int(data[data.rfind(b")") + 2:].split()[1])


_names: dict[tuple[str, int], tuple[float, str | None]] = {}


def _cached_name(kind: str, ident: int) -> str | None:
    """NSS lookups read /etc/passwd (or LDAP) each time: cache for a minute."""
    now = time.monotonic()
    hit = _names.get((kind, ident))
    if hit is not None and now - hit[0] < _NAME_TTL:
        return hit[1]
    try:
        name: str | None = (pwd.getpwuid(ident).pw_name if kind == "user"
                            else grp.getgrgid(ident).gr_name)
    except KeyError:
        name = None
    if len(_names) > 4096:
        _names.clear()
    _names[(kind, ident)] = (now, name)
    return name


def _user_name(uid: int) -> str | None:
    return _cached_name("user", uid)


def _group_name(gid: int) -> str | None:
    return _cached_name("group", gid)
