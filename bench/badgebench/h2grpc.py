"""A lean gRPC unary client over HTTP/2 on a Unix socket, for the load generator.

grpcio's Python client spends ~250-550 µs of CPU per call (measured by this
benchmark), which on a 2-core machine takes CPU from the daemon under test and
would make badged look slower than it is. ssh-agent is driven by a raw-socket
client costing ~25 µs per call; this is the same for badged: one persistent
HTTP/2 connection, one HEADERS + DATA write per call, and a frame loop that
answers SETTINGS and PING and reads DATA until the stream ends.

Headers are HPACK-encoded the way grpcio's client encodes them (captured
from grpcio 1.x: the first call on a connection sends each header as a
literal *with incremental indexing*, every later call the same headers as
one-byte references into the dynamic table, e.g. ``c3c28386c1c0bfbe``).
An earlier version sent literals without indexing on every call, which made
the daemon decode ~100 bytes of literals per call that no real client sends.

A call succeeds only if a gRPC message arrived: a failed call is answered
"trailers-only" (no DATA), so no HPACK decoding is needed to tell them apart.
"""

from __future__ import annotations

import socket
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
MAX_WINDOW = 2**31 - 1


class GrpcCallError(RuntimeError):
    pass


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", ftype, flags, stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(s: bytes) -> bytes:
    return _hpack_int(len(s), 7, 0) + s  # no Huffman


# Static-table indices (RFC 7541 Appendix A) used below.
_STATIC_NAME = {b":authority": 1, b":path": 4, b"content-type": 31, b"te": 0,
                b"user-agent": 58}
_STATIC_FULL = {(b":method", b"POST"): 3, (b":scheme", b"http"): 6}


def request_headers(path: str, authority: str = "localhost") -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
            (b":authority", authority.encode()), (b"content-type", b"application/grpc"),
            (b"te", b"trailers")]


class HpackIndexer:
    """The encoder half of HPACK's dynamic table, for a handful of fixed headers.

    A header not in the table is sent as a literal with incremental indexing
    and inserted at index 62 (older entries move up one); one already there
    is sent as an indexed field. Entries are never evicted: a few short
    headers stay far below the default 4,096-byte table.
    """

    def __init__(self) -> None:
        self._table: list[tuple[bytes, bytes]] = []  # newest first (index 62)
        self._cache: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}

    def encode(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        key = tuple(headers)
        block = self._cache.get(key)
        if block is not None:
            return block
        out = bytearray()
        inserted = False
        for name, value in headers:
            full = _STATIC_FULL.get((name, value))
            if full is not None:
                out += _hpack_int(full, 7, 0x80)
            elif (name, value) in self._table:
                out += _hpack_int(62 + self._table.index((name, value)), 7, 0x80)
            else:
                idx = _STATIC_NAME.get(name, 0)
                out += _hpack_int(idx, 6, 0x40)
                if not idx:
                    out += _hpack_str(name)
                out += _hpack_str(value)
                self._table.insert(0, (name, value))
                inserted = True
        block = bytes(out)
        if inserted:
            self._cache.clear()  # every cached block's indices just moved
        else:
            self._cache[key] = block  # stable until the next insertion
        return block


class H2GrpcChannel:
    """One HTTP/2 connection; unary calls one at a time (closed loop)."""

    def __init__(self, socket_path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(socket_path)
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, MAX_WINDOW)
        self._sock.sendall(PREFACE + _frame(SETTINGS, 0, 0, settings)
                           + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535)))
        self._buf = bytearray()
        self._stream = 1
        self._hpack = HpackIndexer()

    def unary(self, path: str, request: bytes) -> bytes:
        """Send one request message; return the response message bytes."""
        block = self._hpack.encode(request_headers(path))
        sid = self._stream
        self._stream += 2
        msg = b"\x00" + struct.pack(">I", len(request)) + request
        self._sock.sendall(_frame(HEADERS, END_HEADERS, sid, block)
                           + _frame(DATA, END_STREAM, sid, msg))
        return self._read_response(sid)

    def _read_response(self, sid: int) -> bytes:
        buf = self._buf
        sock = self._sock
        body = bytearray()
        while True:
            while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise GrpcCallError("connection closed by the server")
                buf += chunk
            length = int.from_bytes(buf[:3], "big")
            ftype, flags = buf[3], buf[4]
            stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(buf[9:9 + length])
            del buf[:9 + length]
            if stream == sid:
                if ftype == DATA:
                    if flags & PADDED:
                        payload = payload[1:len(payload) - payload[0]]
                    body += payload
                elif ftype == RST_STREAM:
                    raise GrpcCallError(f"stream reset, code {int.from_bytes(payload, 'big')}")
                if ftype in (DATA, HEADERS) and flags & END_STREAM:
                    if len(body) < 5:
                        raise GrpcCallError("call failed (trailers-only answer)")
                    return bytes(body[5:])
            elif stream == 0:
                if ftype == SETTINGS and not flags & ACK:
                    sock.sendall(_frame(SETTINGS, ACK, 0, b""))
                elif ftype == PING and not flags & ACK:
                    sock.sendall(_frame(PING, ACK, 0, payload))
                elif ftype == GOAWAY:
                    raise GrpcCallError("server sent GOAWAY")

    def close(self) -> None:
        self._sock.close()
