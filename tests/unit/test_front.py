"""The socket front on real sockets: relay, registration, per-uid cap, cleanup."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat

from badged.listener.front import SocketFront
from badged.listener.peers import PeerRegistry
from tests.conftest import short_tmpdir


async def _echo_server(path: str, seen: list[str]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        seen.append(sock.getpeername())
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path=path)


def test_front_relays_registers_caps_and_cleans_up() -> None:
    base = short_tmpdir("bfr")

    async def scenario() -> None:
        private = str(base / "grpc.sock")
        seen: list[str] = []
        server = await _echo_server(private, seen)
        registry = PeerRegistry()
        front = SocketFront(registry=registry, private_path=private, max_per_uid=2)
        public = base / "agent.sock"
        await front.serve(public, channel="workload", mode=0o666)
        assert stat.S_IMODE(os.stat(public).st_mode) == 0o666
        loop = asyncio.get_running_loop()

        async def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, str(public))
            return s

        a = await connect()
        b = await connect()
        await loop.sock_sendall(a, b"ping" * 1000)
        got = b""
        while len(got) < 4000:
            got += await loop.sock_recv(a, 65536)
        assert got == b"ping" * 1000
        await loop.sock_sendall(b, b"x")
        assert await loop.sock_recv(b, 10) == b"x"
        # The upstream side was bound to a registered abstract name.
        assert len(seen) == 2 and all(isinstance(n, bytes | str) for n in seen)
        names = [n.decode() if isinstance(n, bytes) else n for n in seen]
        for name in names:
            peer = registry.lookup("unix-abstract:" + name.lstrip("\0"))
            assert peer is not None and peer.pid == os.getpid() and peer.channel == "workload"
        assert registry.connections_of(os.getuid()) == 2

        c = await connect()  # third connection of this uid: refused (closed at once)
        assert await asyncio.wait_for(loop.sock_recv(c, 10), 5) == b""
        c.close()

        a.close()
        b.close()
        for _ in range(100):
            if len(registry) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(registry) == 0, "registry entries leaked after close"

        await front.stop_accepting()
        assert not public.exists()
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(scenario())
    finally:
        shutil.rmtree(base, ignore_errors=True)
