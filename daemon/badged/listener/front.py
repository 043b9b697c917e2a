"""The socket front: accept on the public sockets, attest, relay to grpcio.

Design measured in FINDINGS §1. For each accepted connection we

1. read SO_PEERCRED and a pidfd from the kernel (``read_peer``);
2. refuse the connection if its uid already holds ``max_per_uid`` connections
   (each costs three fds);
3. bind a fresh socket to an unguessable abstract name, register the peer
   under that name, and connect it to the private gRPC socket, which lives in
   a 0700 directory only the daemon's user can enter;
4. relay bytes both ways with asyncio protocols on the gRPC server's own
   event loop (no extra threads: threads would compete with token signing for
   the GIL, FINDINGS §2), honouring back-pressure in both directions.

The registry entry is released when either side closes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import cast

from badged.errors import ConfigError
from badged.listener.peers import PeerCredentials, PeerRegistry, read_peer

_logger = logging.getLogger(__name__)


class _Link:
    """One client connection and its upstream twin."""

    def __init__(self, front: SocketFront, channel: str) -> None:
        self.front = front
        self.channel = channel
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.address: str | None = None
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.address is not None:
            self.front.registry.release(self.address)
        for t in (self.client, self.upstream):
            if t is not None:
                t.close()
        self.front.links.discard(self)


class _ClientSide(asyncio.Protocol):
    def __init__(self, link: _Link) -> None:
        self.link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but have its API.
        transport = cast(asyncio.Transport, transport)
        link = self.link
        link.client = transport
        link.front.links.add(link)
        sock: socket.socket = transport.get_extra_info("socket")
        try:
            peer = read_peer(sock, link.channel)
        except OSError as exc:
            _logger.warning("cannot read peer credentials", extra={"error": str(exc)})
            link.close()
            return
        if link.front.registry.connections_of(peer.uid) >= link.front.max_per_uid:
            _logger.warning("connection refused: per-uid limit",
                            extra={"uid": peer.uid, "limit": link.front.max_per_uid})
            if peer.pidfd >= 0:
                os.close(peer.pidfd)
            link.close()
            return
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(link.front._open_upstream(link, peer))
        link.front.tasks.add(task)
        task.add_done_callback(link.front.tasks.discard)

    def data_received(self, data: bytes) -> None:
        if self.link.upstream is not None:
            self.link.upstream.write(data)

    def eof_received(self) -> bool:
        # Close both sides on EOF: gRPC clients do not half-close, and keeping
        # half-open links is how an early relay leaked registry entries.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()

    def pause_writing(self) -> None:
        if self.link.upstream is not None:
            self.link.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.link.upstream is not None:
            self.link.upstream.resume_reading()


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, link: _Link) -> None:
        self.link = link

    def data_received(self, data: bytes) -> None:
        if self.link.client is not None:
            self.link.client.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()

    def pause_writing(self) -> None:
        if self.link.client is not None:
            self.link.client.pause_reading()

    def resume_writing(self) -> None:
        if self.link.client is not None:
            self.link.client.resume_reading()


class SocketFront:
    """Owns the public sockets and the relay links."""

    def __init__(self, *, registry: PeerRegistry, private_path: str, max_per_uid: int) -> None:
        self.registry = registry
        self.private_path = private_path
        self.max_per_uid = max_per_uid
        self.links: set[_Link] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._servers: list[tuple[asyncio.Server, Path]] = []
        self._nonce = secrets.token_hex(4)
        self._counter = itertools.count()

    async def serve(self, path: Path, *, channel: str, mode: int, group: int | None = None) -> None:
        """Listen on ``path`` with exactly ``mode`` (and group), then accept."""
        sock = _bind_unix(path, mode=mode, group=group)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _ClientSide(_Link(self, channel)), sock=sock)
        self._servers.append((server, path))
        _logger.info("listening", extra={"socket": str(path), "channel": channel,
                                         "mode": f"{mode:04o}"})

    async def _open_upstream(self, link: _Link, peer: PeerCredentials) -> None:
        loop = asyncio.get_running_loop()
        name = f"badged-{self._nonce}-{next(self._counter)}-{secrets.token_hex(8)}"
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            up.setblocking(False)
            up.bind("\0" + name)
            # Registered before connecting: the first RPC may arrive at once.
            self.registry.register(name, peer)
            link.address = name
            await loop.sock_connect(up, self.private_path)
            transport, _ = await loop.create_unix_connection(lambda: _UpstreamSide(link), sock=up)
        except OSError as exc:
            _logger.error("relay to gRPC server failed", extra={"error": str(exc)})
            up.close()
            if link.address is None and peer.pidfd >= 0:
                os.close(peer.pidfd)
            link.close()
            return
        if link.closed:
            transport.close()
            return
        link.upstream = transport
        if link.client is not None:
            link.client.resume_reading()

    async def stop_accepting(self) -> None:
        """Stop accepting and remove the socket files; live links continue."""
        for server, path in self._servers:
            server.close()
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        for server, _ in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def close_links(self) -> None:
        for link in list(self.links):
            link.close()


def _bind_unix(path: Path, *, mode: int, group: int | None) -> socket.socket:
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
    if group is not None:
        os.chown(tmp, -1, group)
    os.chmod(tmp, mode)
    os.rename(tmp, path)
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
