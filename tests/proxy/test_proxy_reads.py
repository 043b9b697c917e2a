"""The proxy reads its socket in pieces below glibc's mmap threshold, like the front.

asyncio's default read size (256 KiB) costs an mmap/munmap pair per request
(tests/unit/test_front_reads.py); the proxy's aiohttp protocol lowers it at
accept, for a real connection on a real Unix socket.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from aiohttp import web

from badged.listener.front import READ_SIZE
from badged.proxy import server as proxy_server
from tests.conftest import short_tmpdir


def test_an_accepted_proxy_connection_reads_read_size_at_a_time() -> None:
    base = short_tmpdir("prd")
    sizes: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def handle(_request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(text="ok")

        web_server = web.Server(handle)
        owner = SimpleNamespace(per_uid={}, max_per_uid=8)
        handlers: list[proxy_server._Handler] = []

        def factory() -> proxy_server._Handler:
            handler = proxy_server._Handler(web_server, loop=loop)
            handler.owner = owner  # type: ignore[assignment]
            handlers.append(handler)
            return handler

        path = base / "p.sock"
        srv = await loop.create_unix_server(factory, path=str(path))
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            for handler in handlers:
                transport = handler.transport
                assert transport is not None
                sizes.append(transport.max_size)  # type: ignore[attr-defined]
            writer.close()
        finally:
            srv.close()
            await web_server.shutdown(1.0)

    asyncio.run(main())
    assert sizes == [READ_SIZE]
