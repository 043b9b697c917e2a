"""Workload attestation: what the kernel says about the calling process.

Nothing here comes from the request. We read ``/proc/<pid>`` for the process
that connected, then confirm with its pidfd that the *same* process is still
alive -- so a caller that exited (and whose pid may already belong to someone
else) gets PERMISSION_DENIED instead of another process's attributes
(SPIRE's peertracker pattern: attest, then check liveness).

The executable is hashed through ``/proc/<pid>/exe``, i.e. the file actually
mapped, not a path the caller could swap; hashes are cached by
(dev, inode, size, mtime, ctime) so the hot path costs one ``stat``. ctime is
in the key because it cannot be set from user space: a same-size rewrite in
place with the mtime restored (``touch -d``) still changes it.

Selectors the caller could forge are not emitted (docs/threat-model.md):

* the executable must be the one the connection had at accept
  (``PeerCredentials.exe``); an exec after connect ends the connection's
  right to any agent;
* ``unix:path`` (and the parent chain) names a path only when the file the
  *daemon* finds at that path is the very file executing (same device and
  inode); the caller's own path, moreover, only for callers in the daemon's
  mount namespace: one in another namespace gets
  ``unix:path_other_mount_ns:`` instead, which only rules that opt in
  (``other_mount_ns = true``) accept;
* ``systemd:unit`` and ``container:id`` come only from cgroup directories
  that the caller cannot create or rename: the directory and every ancestor
  up to the cgroup2 root owned by root, not group/other-writable, and not
  inside a ``user@UID.service`` subtree. Unverifiable means no selector.
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
from pathlib import Path

from badged.errors import AttestationError
from badged.listener.peers import PeerCredentials, mount_namespace

_logger = logging.getLogger(__name__)

PARENT_LEVELS = 4
# Groups, cgroup and parent chain change rarely and cost ~8 /proc reads; they
# are re-read at most this often per process. The executable is re-read on
# every request (an exec must take effect at once).
SLOW_ATTRS_TTL = 1.0
_NAME_TTL = 60.0
# A path's (dev, inode) as the daemon sees it, and a cgroup directory's
# ownership, are re-checked at most this often (a package upgrade that
# replaces a pinned binary is noticed within this long).
PATH_TTL = 1.0
CGROUP_TTL = 5.0
_CONTAINER_RE = re.compile(r"(?:docker|libpod|cri-containerd|crio|containerd)[-/]([0-9a-f]{64})")
_BARE_ID_RE = re.compile(r"/([0-9a-f]{64})(?:\.scope)?$")
# Emitted instead of unix:path for a caller in another mount namespace; not a
# selector type a policy file may name (parse_selector refuses it), only what
# a rule with ``other_mount_ns = true`` matches its unix:path selectors against.
OTHER_NS_PATH = "unix:path_other_mount_ns:"
EXEC_CHANGED = "executable changed since connect"


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


def _depth_at(cgroup: str, end: int) -> int:
    """Index of the path component of ``cgroup`` that contains offset ``end - 1``."""
    return len(cgroup[:end].strip("/").split("/")) - 1


def _unit_depth(cgroup: str) -> int:
    parts = cgroup.strip("/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        part = parts[i]
        if part.endswith((".service", ".scope")) and not part.startswith("user@"):
            return i
    return -1


def _container_depth(cgroup: str) -> int:
    m = _CONTAINER_RE.search(cgroup) or _BARE_ID_RE.search(cgroup)
    return _depth_at(cgroup, m.end()) if m else -1


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where the cgroup v2 hierarchy is mounted in *our* mount namespace.

    ``/sys/fs/cgroup`` on unified systems, ``/sys/fs/cgroup/unified`` on
    hybrid ones. Only a mount of the hierarchy's root counts: with another
    root the paths in /proc/PID/cgroup would not map onto it, and the cgroup
    selectors fail closed.
    """
    try:
        with open(mountinfo) as fh:
            for line in fh:
                head, sep, tail = line.partition(" - ")
                if not sep or tail.split(" ", 1)[0] != "cgroup2":
                    continue
                fields = head.split(" ")
                if len(fields) >= 5 and fields[3] == "/":
                    return Path(_unescape(fields[4]))
    except OSError:
        pass
    return None


def _unescape(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


class CgroupTrust:
    """Which cgroup names the caller cannot have chosen.

    systemd gives every logged-in user a delegated subtree
    (``user@UID.service``, owned by that user): inside it the user creates any
    directory name, ``deploy-bot.service`` or ``docker-<64 hex>.scope``
    included. A name counts only when its directory and every ancestor up to
    the cgroup2 root are owned by root and writable by nobody else, and no
    component is ``user@…``. Whatever cannot be verified yields nothing.
    """

    def __init__(self, mount: Path | None, *, ttl: float = CGROUP_TTL) -> None:
        self._mount = mount
        self._ttl = ttl
        self._cache: OrderedDict[str, tuple[float, str | None, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def discover(cls) -> CgroupTrust:
        """Trust rooted at the cgroup2 mount of the daemon's own mount namespace."""
        return cls(cgroup2_mount())

    @property
    def mount(self) -> Path | None:
        return self._mount

    def names(self, cgroup: str | None) -> tuple[str | None, str | None]:
        """(systemd unit, container id) the caller could not forge, each or None."""
        if not cgroup or self._mount is None:
            return None, None
        now = time.monotonic()
        hit = self._cache.get(cgroup)  # one dict read: atomic, no lock
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1], hit[2]
        unit = unit_of(cgroup)
        if unit is not None and not self._root_owned(cgroup, _unit_depth(cgroup)):
            unit = None
        container = container_of(cgroup)
        if container is not None and not self._root_owned(cgroup, _container_depth(cgroup)):
            container = None
        with self._lock:
            self._cache[cgroup] = (now, unit, container)
            while len(self._cache) > 512:
                self._cache.popitem(last=False)
        return unit, container

    def _root_owned(self, cgroup: str, depth: int) -> bool:
        """The cgroup root and components 0..depth of ``cgroup``: root's, and only root's."""
        assert self._mount is not None
        parts = cgroup.strip("/").split("/")
        if depth < 0 or depth >= len(parts):
            return False
        if any(p in ("", ".", "..") or p.startswith("user@") for p in parts[:depth + 1]):
            return False
        here = self._mount
        for part in [None, *parts[:depth + 1]]:
            if part is not None:
                here = here / part
            try:
                st = os.stat(here, follow_symlinks=False)
            except OSError:
                return False
            if st.st_uid != 0 or st.st_mode & 0o022:
                return False
        # A root-owned directory whose cgroup.procs was handed to a user still
        # lets that user move processes in: check the file too.
        try:
            st = os.stat(here / "cgroup.procs", follow_symlinks=False)
        except OSError:
            return False
        return st.st_uid == 0 and not st.st_mode & 0o022


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
    # The daemon found ``exe`` at that path in its own mount namespace (same
    # device and inode): only then is there a unix:path selector.
    exe_path_verified: bool = False
    # The caller runs in another mount namespace than the daemon.
    other_mount_ns: bool = False
    # Unit and container id from root-owned cgroup directories only (CgroupTrust).
    unit: str | None = None
    container_id: str | None = None
    # Per chain entry: verified like exe_path_verified, in our namespace.
    chain_verified: tuple[bool, ...] = ()

    def selectors(self) -> frozenset[str]:
        """SPIRE-style unix selectors; exe selectors only when readable and verified.

        Computed once per attributes object (the pipeline asks several
        times per request). The attestor hands a connection the same object
        only while its slow reads are the same (at most SLOW_ATTRS_TTL), so
        the user and group names in them, looked up (TTL-cached) when the
        object first computes them, are no staler than before.
        """
        cached: frozenset[str] | None = self.__dict__.get("_selectors")
        if cached is not None:
            return cached
        path = self.exe if self.exe_path_verified else None
        chain = tuple(p if ok else "" for p, ok in zip(self.chain, self.chain_verified,
                                                       strict=False))
        sels = _selectors(self.uid, self.gid, self.groups, _user_name(self.uid),
                          _group_name(self.gid), path, self.other_mount_ns, self.exe_sha256,
                          self.cgroup, self.unit, self.container_id, chain)
        object.__setattr__(self, "_selectors", sels)
        return sels

    def summary(self) -> dict[str, object]:
        """For logs and audit: everything but nothing secret."""
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "exe": self.exe,
                "exe_sha256": self.exe_sha256, "exe_path_verified": self.exe_path_verified,
                "other_mount_ns": self.other_mount_ns, "cgroup": self.cgroup,
                "unit": self.unit, "container_id": self.container_id, "chain": list(self.chain)}


# A pure function of the attributes: the same caller on every request gets the
# same frozenset instead of ~12 formatted strings and a set (~2 µs a call).
@lru_cache(maxsize=1024)
def _selectors(uid: int, gid: int, groups: tuple[int, ...], user: str | None,
               group: str | None, path: str | None, other_ns: bool, exe_sha256: str | None,
               cgroup: str | None, unit: str | None, container: str | None,
               chain: tuple[str, ...]) -> frozenset[str]:
    sels = {f"unix:uid:{uid}", f"unix:gid:{gid}"}
    for g in groups:
        sels.add(f"unix:supplementary_gid:{g}")
    if user:
        sels.add(f"unix:user:{user}")
    if group:
        sels.add(f"unix:group:{group}")
    if path:
        sels.add(f"{OTHER_NS_PATH}{path}" if other_ns else f"unix:path:{path}")
    if exe_sha256:
        sels.add(f"unix:sha256:{exe_sha256}")
    if cgroup:
        sels.add(f"unix:cgroup:{cgroup}")
    if unit:
        sels.add(f"systemd:unit:{unit}")
    if container:
        sels.add(f"container:id:{container}")
    if chain:
        if chain[0]:
            sels.add(f"unix:parent_path:{chain[0]}")
        for p in chain:
            if p:
                sels.add(f"unix:ancestor_path:{p}")
    return frozenset(sels)


_HashKey = tuple[int, int, int, int, int]  # dev, inode, size, mtime_ns, ctime_ns
# read_at, groups, cgroup, parent chain, chain entries verified
_Slow = tuple[float, tuple[int, ...], str | None, tuple[str, ...], tuple[bool, ...]]


class ProcessAttestor:
    """Reads /proc for a peer and guards the result with its pidfd."""

    def __init__(self, *, cache_size: int = 1024, cgroups: CgroupTrust | None = None,
                 path_ttl: float = PATH_TTL) -> None:
        self._hashes: OrderedDict[_HashKey, str] = OrderedDict()
        self._paths: OrderedDict[tuple[int, _HashKey], str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # (pid, start_time) -> (read_at, groups, cgroup, chain, chain_verified)
        self._slow: OrderedDict[tuple[int, int], _Slow] = OrderedDict()
        # path -> (checked_at, dev, inode) of what the daemon finds there.
        self._path_ids: OrderedDict[str, tuple[float, int, int]] = OrderedDict()
        self._path_ttl = path_ttl
        self._cgroups = cgroups if cgroups is not None else CgroupTrust.discover()
        self._mnt_ns = mount_namespace(os.getpid())

    def attest(self, peer: PeerCredentials) -> ProcessAttributes:
        if peer.lost.reason is not None:
            raise AttestationError(f"connection of pid {peer.pid} lost its identity: "
                                   f"{peer.lost.reason}",
                                   public=f"caller attestation failed: {peer.lost.reason}")
        try:
            st: os.stat_result | None = os.stat(f"/proc/{peer.pid}/exe")
        except OSError:
            # Gone, or another user's process without CAP_SYS_PTRACE: exe
            # unknown, and every exe-based selector fails closed.
            st = None
        snap = peer.exe
        if (st is None) != (snap is None) or (
                st is not None and snap is not None and not snap.same_file(st.st_dev, st.st_ino)):
            self._exec_after_connect(peer)
        exe, digest, verified = self._exe(peer.pid, st) if st is not None else (None, None, False)
        slow = self._slow_attrs(peer)
        unit, container = self._cgroups.names(slow[2])
        # Everything above was read by pid; only now do we know it was *this*
        # process and not a successor that inherited the pid. One check, after
        # the reads, is what makes them trustworthy (a check before them would
        # only fail earlier, for one more poll() on every call).
        if not peer.is_alive():
            raise AttestationError(f"caller pid {peer.pid} exited before or during attestation")
        # The same inputs as this connection's last request: the same answer,
        # as the same object (its selectors are computed once). ``slow`` is
        # compared by identity: a re-read (at most SLOW_ATTRS_TTL old) makes
        # a new tuple, so no attributes object outlives its slow reads, and
        # the user and group names in its selectors are as fresh as before.
        key = (exe, digest, verified, unit, container)
        last = peer.memo.attested
        if last is not None and last[0] is slow and last[1] == key and isinstance(
                last[2], ProcessAttributes):
            return last[2]
        groups, cgroup, chain, chain_ok = slow[1], slow[2], slow[3], slow[4]
        other_ns = snap is not None and snap.mnt_ns != self._mnt_ns
        attrs = ProcessAttributes(pid=peer.pid, uid=peer.uid, gid=peer.gid, groups=groups,
                                  exe=exe, exe_sha256=digest, cgroup=cgroup, chain=chain,
                                  exe_path_verified=verified, other_mount_ns=other_ns,
                                  unit=unit, container_id=container, chain_verified=chain_ok)
        peer.memo.attested = (slow, key, attrs)
        return attrs

    def _exec_after_connect(self, peer: PeerCredentials) -> None:
        """The process behind the connection no longer runs what it ran at accept.

        Either it exited (say so) or it exec'd: the connection then loses its
        right to any agent for good, even if it execs back.
        """
        if not peer.is_alive():
            raise AttestationError(f"caller pid {peer.pid} exited before or during attestation")
        peer.lost.set(EXEC_CHANGED)
        _logger.warning("executable changed since connect; connection refused for good",
                        extra={"pid": peer.pid, "uid": peer.uid})
        raise AttestationError(f"pid {peer.pid} uid {peer.uid}: {EXEC_CHANGED}",
                               public=f"caller attestation failed: {EXEC_CHANGED}")

    def _groups(self, pid: int) -> tuple[int, ...]:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("Groups:"):
                        return tuple(sorted(int(g) for g in line.split()[1:]))
        except OSError:
            pass
        return ()

    def _slow_attrs(self, peer: PeerCredentials) -> _Slow:
        """(read_at, groups, cgroup, chain, chain_verified): the cached tuple itself,
        re-read at most every SLOW_ATTRS_TTL (its identity says which read it is)."""
        key = (peer.pid, peer.start_time)
        now = time.monotonic()
        with self._lock:
            hit = self._slow.get(key)
        if hit is not None and now - hit[0] < SLOW_ATTRS_TTL:
            return hit
        chain, chain_ok = self._chain(peer.pid)
        value = (now, self._groups(peer.pid), self._cgroup(peer.pid), chain, chain_ok)
        with self._lock:
            self._slow[key] = value
            self._slow.move_to_end(key)
            while len(self._slow) > self._cache_size:
                self._slow.popitem(last=False)
        return value

    def _chain(self, pid: int) -> tuple[tuple[str, ...], tuple[bool, ...]]:
        chain: list[str] = []
        verified: list[bool] = []
        current = pid
        for _ in range(PARENT_LEVELS):
            current = _ppid(current)
            if current <= 1:
                break
            try:
                exe = os.readlink(f"/proc/{current}/exe")
                st = os.stat(f"/proc/{current}/exe")
            except OSError:
                break
            path = exe.removesuffix(" (deleted)")
            chain.append(path)
            # The daemon must find that very file at that path (a bind mount
            # in the ancestor's own namespace does not pass). No namespace
            # rule here: under a hardened unit the daemon has a mount
            # namespace of its own, and ancestors are weaker evidence anyway.
            verified.append(self._path_is(path, st.st_dev, st.st_ino))
        return tuple(chain), tuple(verified)

    def _cgroup(self, pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/cgroup") as fh:
                for line in fh:
                    if line.startswith("0::"):
                        return line[3:].strip()
        except OSError:
            pass
        return None

    def _path_is(self, path: str, dev: int, ino: int) -> bool:
        """Is ``path``, resolved in the daemon's mount namespace, the file (dev, ino)?

        This is what defeats a bind mount over a pinned path inside a user +
        mount namespace: the caller's /proc/PID/exe names the pinned path,
        but the daemon finds another file there. Cached per path for
        ``PATH_TTL`` (one dict lookup on the hot path).
        """
        now = time.monotonic()
        hit = self._path_ids.get(path)  # one dict read: atomic, no lock
        if hit is None or now - hit[0] >= self._path_ttl:
            try:
                st = os.stat(path)
                hit = (now, st.st_dev, st.st_ino)
            except OSError:
                hit = (now, -1, -1)
            with self._lock:
                self._path_ids[path] = hit
                self._path_ids.move_to_end(path)
                while len(self._path_ids) > self._cache_size:
                    self._path_ids.popitem(last=False)
        return hit[1] == dev and hit[2] == ino

    def _exe(self, pid: int, st: os.stat_result) -> tuple[str | None, str | None, bool]:
        # Hot path: the caller's one stat() through the magic link identifies
        # the mapped file (dev, inode, size, mtime, ctime); when that file was
        # seen before, its hash and this process's path are known and nothing
        # else is read.
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            digest = self._hashes.get(key)
            path = self._paths.get((pid, key)) if digest is not None else None
        if digest is None or path is None:
            try:
                path = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
                if digest is None:
                    digest = self._hash_exe(pid, key)
            except OSError:
                return None, None, False
            if digest is None:  # the file changed under us: no identity
                return None, None, False
            with self._lock:
                self._paths[(pid, key)] = path
                while len(self._paths) > self._cache_size:
                    self._paths.popitem(last=False)
        return path, digest, self._path_is(path, st.st_dev, st.st_ino)

    def _hash_exe(self, pid: int, key: _HashKey) -> str | None:
        fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != key:
                return None
            h = hashlib.sha256()
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
            digest = h.hexdigest()
            # Written while we read? Then the digest is of neither version.
            if os.fstat(fd).st_ctime_ns != key[4]:
                return None
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
