"""A hostile local user against the workload socket (root only: drops to ``uid`` first).

    hostile_client.py UID SOCKET bodies CONNS STREAMS BODY HOLD

``bodies``: CONNS connections each open STREAMS FetchToken streams whose
request message declares BODY bytes and sends all but the last few, within
the flow-control windows the daemon grants (a careful attacker does not
trip FLOW_CONTROL_ERROR), opening more whenever a WINDOW_UPDATE arrives,
and never finishes. Then it waits up to HOLD seconds and reports, as JSON,
how each connection ended (GOAWAY code and reason, or still open) and how
many body bytes the daemon let it send.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys
import time

import hpack

uid, mode, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conns_n, streams_n, body, hold = (int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]),
                                  float(sys.argv[7]))
os.setgroups([])
os.setgid(uid)
os.setuid(uid)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", ftype, flags, sid) + payload


class Conn:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.enc = hpack.Encoder()
        self.buf = b""
        self.window = 65535
        self.stream_window = 65535
        self.next_sid = 1
        self.open = 0
        self.sent = 0
        self.goaway: tuple[int, str] | None = None
        self.closed = False
        self.sock.sendall(PREFACE + frame(4, 0, 0, b""))

    def pump(self, timeout: float) -> None:
        if self.closed:
            return
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        try:
            chunk = self.sock.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
            return
        self.buf += chunk
        while len(self.buf) >= 9 and len(self.buf) >= 9 + int.from_bytes(self.buf[:3], "big"):
            n = int.from_bytes(self.buf[:3], "big")
            ftype, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big")
            payload = self.buf[9:9 + n]
            self.buf = self.buf[9 + n:]
            if ftype == 4 and not flags & 1:
                for i in range(0, len(payload), 6):
                    ident, value = struct.unpack_from(">HI", payload, i)
                    if ident == 4:
                        self.stream_window = value
                self.sock.sendall(frame(4, 1, 0, b""))
            elif ftype == 8 and sid == 0:
                self.window += int.from_bytes(payload, "big") & 0x7FFFFFFF
            elif ftype == 7:
                self.goaway = (int.from_bytes(payload[4:8], "big"),
                               payload[8:].decode("ascii", "replace"))
            elif ftype == 3:
                self.open -= 1

    def attack(self) -> None:
        """Open streams with unfinished bodies while the windows allow."""
        while not self.closed and self.goaway is None and self.open < streams_n:
            part = min(body - 5 - 3, self.stream_window - 8, self.window)
            if part < 1024:
                return
            sid = self.next_sid
            self.next_sid += 2
            headers = self.enc.encode([(":method", "POST"), (":scheme", "http"),
                                       (":path", "/badged.v1.WorkloadService/FetchToken"),
                                       (":authority", "x"), ("content-type", "application/grpc")])
            data = b"\0" + (body - 5).to_bytes(4, "big") + b"\x0a" * (part - 5)
            out = frame(1, 4, sid, headers)
            for i in range(0, len(data), 16384):
                out += frame(0, 0, sid, data[i:i + 16384])
            try:
                self.sock.sendall(out)
            except OSError:
                self.closed = True
                return
            self.window -= len(data)
            self.sent += len(data)
            self.open += 1


conns = [Conn() for _ in range(conns_n)]
start = time.monotonic()
while time.monotonic() - start < hold:
    for c in conns:
        c.pump(0.0)
        c.attack()
    if all(c.closed or c.goaway for c in conns):
        break
    time.sleep(0.01)
print(json.dumps({
    "elapsed": time.monotonic() - start,
    "sent": sum(c.sent for c in conns),
    "ended": [{"goaway": c.goaway, "closed": c.closed} for c in conns],
}), flush=True)
