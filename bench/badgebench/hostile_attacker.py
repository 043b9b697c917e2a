"""One hostile local user running every issue-16 attack at once (``bench/run --hostile``).

    python -m badgebench.hostile_attacker UID SOCKET SECONDS

Run as root: drops to UID (a uid no policy rule matches) before the first
connect, then for SECONDS runs, concurrently and each reconnecting whenever
the daemon closes it: connections holding never-finished request bodies
within the windows granted; idle connections without a preface; rapid
reset; empty CONTINUATION floods; header lists over 16 KiB; refused
FetchToken calls as fast as answers come; zero-window clients that never
read; gzip bombs. Prints counters as JSON at the end. Loopback (a Unix
socket) only.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import struct
import sys
import time
from collections import Counter

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FETCH = "/badged.v1.WorkloadService/FetchToken"
JWKS = "/badged.v1.WorkloadService/GetJwks"
STATS: Counter[str] = Counter()


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", ftype, flags, sid) + payload


class Link:
    """A raw HTTP/2 client connection driven by hand."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.enc = hpack.Encoder()
        self.buf = b""
        self.window = 65535
        self.sid = 1
        self.goaway = False
        self.silent = False  # an idle link answers nothing, not even SETTINGS

    async def open(self, preface: bool = True, settings: bytes = b"") -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, self.path)
        self.sock = s
        STATS["connections"] += 1
        if preface:
            await self.send(PREFACE + frame(4, 0, 0, settings))

    async def send(self, data: bytes) -> None:
        assert self.sock is not None
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def headers(self, path: str, extra: list[tuple[str, str]] | None = None) -> bytes:
        return bytes(self.enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                      (":authority", "x"), ("content-type", "application/grpc"),
                                      *(extra or [])]))

    def next_sid(self) -> int:
        sid, self.sid = self.sid, self.sid + 2
        return sid

    async def pump(self, timeout: float) -> bool:
        """Read what is there (answering SETTINGS); False once the daemon closed the link."""
        assert self.sock is not None
        try:
            chunk = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 1 << 16),
                                           timeout)
        except TimeoutError:
            return True
        except OSError:
            return False
        if not chunk:
            return False
        self.buf += chunk
        while len(self.buf) >= 9 and len(self.buf) >= 9 + int.from_bytes(self.buf[:3], "big"):
            n = int.from_bytes(self.buf[:3], "big")
            ftype, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big")
            payload = self.buf[9:9 + n]
            self.buf = self.buf[9 + n:]
            if ftype == 4 and not flags & 1 and not self.silent:
                await self.send(frame(4, 1, 0, b""))
            elif ftype == 8 and sid == 0:
                self.window += int.from_bytes(payload, "big") & 0x7FFFFFFF
            elif ftype == 7:
                self.goaway = True
                STATS["goaway:" + payload[8:40].decode("ascii", "replace")] += 1
            elif ftype == 1 and flags & 1:
                STATS["answers"] += 1
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


async def forever(name: str, attack: object, path: str, deadline: float) -> None:
    """Run one attack on a fresh link until the deadline, reconnecting after each close."""
    while time.monotonic() < deadline:
        link = Link(path)
        try:
            # A send to a daemon that stopped reading us blocks: never past the deadline.
            await asyncio.wait_for(attack(link, deadline),  # type: ignore[operator]
                                   max(0.1, deadline - time.monotonic() + 1.0))
        except (OSError, asyncio.IncompleteReadError):
            STATS[f"{name}:refused"] += 1
        except TimeoutError:
            STATS[f"{name}:blocked"] += 1
        finally:
            link.close()
        await asyncio.sleep(0.05)


async def bodies(link: Link, deadline: float) -> None:
    await link.open()
    while time.monotonic() < deadline and not link.goaway:
        while link.window > 20000 and link.sid < 200:
            sid = link.next_sid()
            part = min(link.window, 100_000) - 8
            body = b"\0" + (120_000).to_bytes(4, "big") + b"\x0a" * (part - 5)
            out = frame(1, 4, sid, link.headers(FETCH))
            for i in range(0, len(body), 16384):
                out += frame(0, 0, sid, body[i:i + 16384])
            await link.send(out)
            link.window -= len(body)
            STATS["body_bytes"] += len(body)
        if not await link.pump(1.0):
            return


async def idle(link: Link, deadline: float) -> None:
    link.silent = True
    await link.open(preface=False)
    while time.monotonic() < deadline:
        if not await link.pump(1.0):
            return


async def rapid_reset(link: Link, deadline: float) -> None:
    await link.open()
    msg = b"\0\0\0\0\0"
    while time.monotonic() < deadline and not link.goaway:
        out = b""
        for _ in range(50):
            sid = link.next_sid()
            out += frame(1, 4, sid, link.headers(FETCH)) + frame(0, 1, sid, msg) \
                + frame(3, 0, sid, b"\0\0\0\x08")
        await link.send(out)
        STATS["resets"] += 50
        if not await link.pump(0.001):
            return


async def continuation(link: Link, deadline: float) -> None:
    await link.open()
    block = link.headers(FETCH)
    await link.send(frame(1, 0, link.next_sid(), block[:4]))
    sid = link.sid - 2
    empty = frame(9, 0, sid, b"") * 1000
    while time.monotonic() < deadline and not link.goaway:
        await link.send(empty)
        STATS["empty_continuations"] += 1000
        if not await link.pump(0.001):
            return


async def big_headers(link: Link, deadline: float) -> None:
    await link.open()
    sid = link.next_sid()
    block = link.headers(FETCH, [("x-pad", "a" * 9000), ("x-pad2", "b" * 9000)])
    await link.send(frame(1, 0, sid, block[:16384]) + frame(9, 4, sid, block[16384:]))
    STATS["oversized_header_lists"] += 1
    while time.monotonic() < deadline:
        if not await link.pump(1.0):
            return


async def denials(link: Link, deadline: float) -> None:
    await link.open()
    req = bytes.fromhex("0a") + bytes([60]) + b"https://attacker.example/" + b"a" * 35
    msg = b"\0" + len(req).to_bytes(4, "big") + req
    while time.monotonic() < deadline and not link.goaway:
        out = b""
        for _ in range(10):
            sid = link.next_sid()
            out += frame(1, 4, sid, link.headers(FETCH)) + frame(0, 1, sid, msg)
        await link.send(out)
        STATS["denial_requests"] += 10
        for _ in range(3):
            if not await link.pump(0.05):
                return


async def zero_window(link: Link, deadline: float) -> None:
    await link.open(settings=struct.pack(">HI", 0x4, 0))
    for _ in range(20):
        sid = link.next_sid()
        await link.send(frame(1, 4, sid, link.headers(JWKS)) + frame(0, 1, sid, b"\0\0\0\0\0"))
    STATS["zero_window_calls"] += 20
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)  # never read, never open the window
        if link.sock is None:
            return
        try:
            link.sock.send(b"")
        except OSError:
            return


async def gzip_bomb(link: Link, deadline: float) -> None:
    await link.open()
    bomb = gzip.compress(b"\0" * 20_000_000)
    msg = b"\x01" + len(bomb).to_bytes(4, "big") + bomb
    while time.monotonic() < deadline and not link.goaway:
        sid = link.next_sid()
        await link.send(frame(1, 4, sid, link.headers(FETCH, [("grpc-encoding", "gzip")]))
                        + b"".join(frame(0, 0, sid, msg[i:i + 16384])
                                   for i in range(0, len(msg) - 16384, 16384))
                        + frame(0, 1, sid, msg[len(msg) - (len(msg) % 16384 or 16384):]))
        STATS["gzip_bombs"] += 1
        if not await link.pump(0.5):
            return


async def main(path: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    plan = ([("bodies", bodies)] * 24 + [("idle", idle)] * 24 + [("reset", rapid_reset)] * 2
            + [("continuation", continuation)] + [("headers", big_headers)] * 2
            + [("denials", denials)] * 2 + [("zero_window", zero_window)] * 2
            + [("gzip", gzip_bomb)])
    await asyncio.gather(*(forever(n, a, path, deadline) for n, a in plan))


if __name__ == "__main__":
    uid, path, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    asyncio.run(main(path, seconds))
    print(json.dumps(dict(STATS.most_common(40))), flush=True)
