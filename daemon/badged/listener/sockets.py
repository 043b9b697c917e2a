"""Binding the public Unix sockets: exact modes from the first instant, no clobbering."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from badged.errors import ConfigError


def bind_unix(path: Path, *, mode: int, group: int | None) -> socket.socket:
    """Bind a listening socket whose mode is right from the first instant.

    The socket is bound under a temporary name with a restrictive umask,
    chmod/chown'ed, then renamed into place, so there is no window in which
    it exists at ``path`` with looser permissions.
    """
    if len(str(path).encode()) >= 108:
        raise ConfigError("socket path too long (limit 107 bytes)", path=str(path))
    if path.exists() or path.is_symlink():
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError("exists and is not a socket; refusing to replace it", path=str(path))
        if _socket_is_live(path):
            raise ConfigError("another daemon is listening here", path=str(path))
        path.unlink()
    remove_stale_temps(path)
    tmp = temp_name(path, os.getpid())
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(str(tmp))
    finally:
        os.umask(old)
    try:
        if group is not None:
            os.chown(tmp, -1, group)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except OSError as exc:
        # Leave nothing behind: no half-made socket under a temporary name.
        sock.close()
        tmp.unlink(missing_ok=True)
        what = f"cannot give the socket group {group}" if exc.errno == 1 else "cannot bind"
        raise ConfigError(f"{what}: {exc.strerror}", path=str(path)) from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


def temp_name(path: Path, pid: int) -> Path:
    """The name a socket is bound under before it is renamed to ``path``."""
    return path.with_name(f".{path.name}.{pid}")


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove ``.NAME.<pid>`` sockets left by daemons that died between bind and rename.

    Only sockets of our uid, only of processes that no longer exist (or our
    own pid, from an earlier start in this process): a live daemon's
    temporary name -- it may be binding right now -- is left alone.
    """
    removed: list[Path] = []
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        pid_text = entry.name[len(prefix):]
        if not entry.name.startswith(prefix) or not pid_text.isdigit():
            continue
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            continue
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            continue
        pid = int(pid_text)
        if pid != os.getpid() and _pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def _socket_is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()
