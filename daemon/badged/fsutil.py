"""Files the daemon writes: atomically, privately, and checked before trusted."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from badged.errors import ConfigError

if TYPE_CHECKING:
    from badged.config import DaemonConfig


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write-then-rename with fsync of file and directory.

    A crash leaves either the old or the new content, never a torn file; the
    directory fsync makes the rename itself durable.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700, or refuse to use it if anyone else could tamper with it.

    Refused: owned by another user, group/world-writable, or a symlink. The
    daemon stores key metadata, grants and the state-dir lock here; a directory
    another user can write would let them swap files under it.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create directory: {exc.strerror}", path=str(path)) from None
    check_dir_safe(path, private=True)


def check_dir_safe(path: Path, *, private: bool) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError("not a directory (or a symlink)", path=str(path))
    if st.st_uid != os.geteuid():
        raise ConfigError(f"owned by uid {st.st_uid}, not the daemon's uid {os.geteuid()}",
                          path=str(path))
    mode = stat.S_IMODE(st.st_mode)
    if private and mode & 0o077:
        raise ConfigError(f"mode {mode:04o} is unsafe; it must be 0700", path=str(path))
    if not private and mode & 0o022:
        raise ConfigError(f"mode {mode:04o} is writable by others; use 0755", path=str(path))


def lock_state_dir(config: DaemonConfig) -> int:
    """One daemon (or ``badged recover``) per state dir, for its whole life.

    An flock released on exit. Without it a second daemon could open the
    same audit log and token state before discovering the public sockets
    are taken. Returns the fd that holds the lock. It lives here, not in
    badged.app, so that ``badged dev`` can take the lock before importing
    the daemon (~0.3 s) and the key-store prefetch overlaps that import.
    """
    import fcntl

    path = config.private_dir / "badged.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError("another badged is running with this state dir",
                          path=str(config.state_dir)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
