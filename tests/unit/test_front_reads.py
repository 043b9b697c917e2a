"""The front reads each socket in pieces below glibc's mmap threshold (hot path).

asyncio's default read size (256 KiB) allocated a bytes object that size per
read: unless glibc's dynamic mmap threshold had been raised by then, an
mmap, an mremap (the shrink to the bytes received) and a munmap per request,
~17 µs of a ~20 µs recv on the reference VM (a 64 KiB read: ~3 µs). The
front lowers it for every connection; a request bigger than one read still
arrives whole.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import grpc

from badged.listener.front import READ_SIZE, GrpcFront
from badged.listener.peers import PeerRegistry
from badged.service.errors import ErrorBoundary
from tests.conftest import short_tmpdir
from tests.unit.test_front import _table, _unary

MAX_MESSAGE = 3 * READ_SIZE


def test_reads_are_below_the_mmap_threshold_and_big_requests_still_arrive() -> None:
    assert READ_SIZE < 128 * 1024  # glibc's default M_MMAP_THRESHOLD
    base = short_tmpdir("brd")
    state: dict[str, Any] = {"peers": []}
    seen: list[int] = []

    async def main() -> None:
        state["slow_started"] = asyncio.Event()
        methods = await _table(state).intercepted([ErrorBoundary(log_details=True)])
        front = GrpcFront(registry=PeerRegistry(), methods=methods, max_per_uid=8,
                          max_message=MAX_MESSAGE)
        public = base / "agent.sock"
        await front.serve(public, channel="workload", mode=0o666)
        try:
            async with grpc.aio.insecure_channel(
                    f"unix:{public}", options=[("grpc.max_send_message_length", MAX_MESSAGE)],
            ) as ch:
                body = b"q" * (2 * READ_SIZE + 7)  # several reads' worth
                assert await _unary(ch, "Echo")(body) == body
                seen.extend(c.transport.max_size for c in front.connections  # type: ignore[attr-defined]
                            if c.transport is not None)
        finally:
            await front.stop_accepting()
            await front.drain(1)
            front.close_links()

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert seen and all(size == READ_SIZE for size in seen)
