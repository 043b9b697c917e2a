"""Binding the public Unix sockets: exact modes from the first instant, no clobbering."""

from __future__ import annotations

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
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    if tmp.exists():
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


def _socket_is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()
