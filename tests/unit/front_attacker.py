"""A hostile local user against a live front (root only: drops to ``uid`` before connecting).

    front_attacker.py UID SOCKET headers SECONDS [CHARS]
    front_attacker.py UID SOCKET refused BUSY

``headers``: for SECONDS, one connection at a time sends a header block
with a CHARS-long value (96,000: ~60 KB Huffman-coded, ~26 ms of the
daemon's CPU to decode before it is found over the 16 KiB list limit;
26,000: ~16 KB, ~7 ms), reads until the GOAWAY, and reconnects at once.
Prints how many blocks the daemon decoded (GOAWAY COMPRESSION_ERROR) and
the GOAWAY reasons.

``refused``: opens BUSY connections, each with a request whose body never
comes (so none is idle and none can be evicted), then one more, and prints
how long that one waited for its GOAWAY and the reason.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

import hpack

uid, path, mode, arg = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.setgroups([])
os.setgid(uid)
os.setuid(uid)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Echo"), (":authority", "x"),
           ("content-type", "application/grpc")]


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", ftype, flags, sid) + payload


def connect() -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(PREFACE + frame(4, 0, 0, b""))
    return s


def goaway(s: socket.socket, timeout: float) -> tuple[int, str] | None:
    """Read until a GOAWAY (code, reason) or EOF/timeout (None)."""
    s.settimeout(timeout)
    buf = b""
    while True:
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n = int.from_bytes(buf[:3], "big")
            if buf[3] == 7:
                payload = buf[9:9 + n]
                return int.from_bytes(payload[4:8], "big"), payload[8:].decode("ascii", "replace")
            buf = buf[9 + n:]
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return None
        if not chunk:
            return None
        buf += chunk


if mode == "headers":
    chars = int(sys.argv[5]) if len(sys.argv) > 5 else 96_000
    block = hpack.Encoder().encode([*REQUEST, ("x-pad", "a" * chars)])
    assert len(block) < 65536
    rest = block[16384:]
    out = frame(1, 0 if rest else 4, 1, block[:16384])
    while rest:
        part, rest = rest[:16384], rest[16384:]
        out += frame(9, 0 if rest else 4, 1, part)
    decoded = 0
    reasons: dict[str, int] = {}
    end = time.monotonic() + float(arg)
    while time.monotonic() < end:
        s = connect()
        try:
            s.sendall(out)
            got = goaway(s, max(0.1, end - time.monotonic()))
        except OSError:
            got = None
        finally:
            s.close()
        if got is not None:
            reasons[got[1][:40]] = reasons.get(got[1][:40], 0) + 1
            decoded += got[0] == 9  # COMPRESSION_ERROR: the whole block was decoded
    print(json.dumps({"decoded": decoded, "reasons": reasons}), flush=True)
else:
    busy = []
    for _ in range(int(arg)):
        s = connect()
        s.sendall(frame(1, 4, 1, hpack.Encoder().encode(REQUEST)))  # no END_STREAM: a body is awaited
        busy.append(s)
    time.sleep(0.2)
    t0 = time.monotonic()
    s = connect()
    got = goaway(s, 10)
    waited = time.monotonic() - t0
    print(json.dumps({"waited": waited, "goaway": got}), flush=True)
