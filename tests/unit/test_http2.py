"""HTTP/2 framing rules of the front, frame by frame, with no I/O (plus a seeded fuzz run).

The end-to-end behaviour against real grpcio clients is in test_front.py and
the e2e suite; here each RFC 9113 rule the docstring of listener/http2.py
promises is fed directly, and what went out is decoded.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Sequence
from typing import Any

import hpack
import pytest

from badged.listener import http2
from badged.listener.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ProtocolViolation,
    ServerConnection,
    frame,
)


class Recorder(ServerConnection):
    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.events: list[tuple[str, int, object, bool]] = []

    def on_request(self, sid: int, headers: Sequence[tuple[bytes, bytes]], end: bool) -> None:
        self.events.append(("request", sid, dict(headers), end))

    def on_data(self, sid: int, data: bytes, end: bool) -> None:
        self.events.append(("data", sid, data, end))

    def on_reset(self, sid: int) -> None:
        self.events.append(("reset", sid, None, False))

    def on_window(self, sid: int) -> None:
        self.events.append(("window", sid, None, False))

    def sent(self) -> list[tuple[int, int, int, bytes]]:
        out, self.out = bytes(self.out), bytearray()
        frames = []
        while out:
            n = int.from_bytes(out[:3], "big")
            frames.append((out[3], out[4], int.from_bytes(out[5:9], "big"), out[9:9 + n]))
            out = out[9 + n:]
        return frames


REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Echo"),
           (":authority", "x"), ("content-type", "application/grpc")]


def block() -> bytes:
    """A request header block from a fresh encoder (no references to older blocks)."""
    return bytes(hpack.Encoder().encode(REQUEST))


def opened() -> Recorder:
    c = Recorder()
    c.receive(PREFACE + frame(SETTINGS, 0, 0, b""))
    c.sent()
    return c


def goaway_code(c: Recorder) -> int:
    frames = [f for f in c.sent() if f[0] == GOAWAY]
    assert frames, "no GOAWAY sent"
    return int.from_bytes(frames[-1][3][4:8], "big")


def test_indexed_header_blocks_follow_the_dynamic_table() -> None:
    """Remembered all-indexed blocks: reused while the table is unchanged, forgotten after."""
    c = opened()
    decode_calls = 0
    real_decode = c._decoder.decode

    def counting(data: bytes, raw: bool = False) -> object:
        nonlocal decode_calls
        decode_calls += 1
        return real_decode(data, raw=raw)

    c._decoder.decode = counting  # type: ignore[method-assign,assignment]
    enc = hpack.Encoder()
    ours = [*REQUEST, ("x-agent", "one")]
    first = bytes(enc.encode(ours))  # literals, indexed into the dynamic table
    again = bytes(enc.encode(ours))  # one-byte references, as grpcio sends
    assert again and not again.translate(None, bytes(range(0x80, 0x100)))
    shift = bytes(enc.encode([("x-agent", "two")]))  # a new entry moves every index by one
    blocks = [first, again, again, again, shift, again, again]
    for i, b in enumerate(blocks):
        c.receive(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, b))
    reference = hpack.Decoder()
    expected = [dict((bytes(k), bytes(v)) for k, v in reference.decode(b, raw=True))
                for b in blocks]
    got = [e[2] for e in c.events if e[0] == "request"]
    assert got == expected
    assert got[5] != got[1]  # the same bytes mean other headers after the shift
    assert decode_calls == 4  # first, again, shift, again: the repeats were remembered


def test_preface_settings_and_ping() -> None:
    c = Recorder()
    first = c.sent()
    assert first[0][0] == SETTINGS and first[1][0] == WINDOW_UPDATE
    c.receive(PREFACE[:10])  # a partial preface waits for more
    c.receive(PREFACE[10:] + frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 1000))
              + frame(PING, 0, 0, b"12345678"))
    sent = c.sent()
    assert (SETTINGS, 1, 0, b"") in sent  # ACK
    assert (PING, 1, 0, b"12345678") in sent
    with pytest.raises(ProtocolViolation):
        Recorder().receive(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 16)


@pytest.mark.parametrize("data, code", [
    (frame(DATA, 0, 1, b"x" * 16385), http2.FRAME_SIZE_ERROR),
    (frame(HEADERS, END_HEADERS, 2, block()), http2.PROTOCOL_ERROR),  # even id
    (frame(CONTINUATION, END_HEADERS, 1, b""), http2.PROTOCOL_ERROR),
    (frame(HEADERS, 0, 1, b"") + frame(PING, 0, 0, b"12345678"), http2.PROTOCOL_ERROR),
    (frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), http2.COMPRESSION_ERROR),
    (frame(SETTINGS, 0, 1, b""), http2.PROTOCOL_ERROR),
    (frame(SETTINGS, 0, 0, b"\0\0\0"), http2.FRAME_SIZE_ERROR),
    (frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 2**31)), http2.FLOW_CONTROL_ERROR),
    (frame(SETTINGS, 0, 0, struct.pack(">HI", 0x5, 100)), http2.PROTOCOL_ERROR),
    (frame(PING, 0, 0, b"1234"), http2.FRAME_SIZE_ERROR),
    (frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), http2.PROTOCOL_ERROR),
    (frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1)), http2.FLOW_CONTROL_ERROR),
    (frame(RST_STREAM, 0, 0, b"\0\0\0\0"), http2.PROTOCOL_ERROR),
    (frame(DATA, 0, 7, b"x"), http2.PROTOCOL_ERROR),  # idle stream
    (frame(5, 0, 1, b"\0\0\0\2"), http2.PROTOCOL_ERROR),  # PUSH_PROMISE
    (frame(DATA, 0x8, 1, b"\x05ab"), http2.PROTOCOL_ERROR),  # padding longer than frame
])
def test_connection_errors_send_goaway(data: bytes, code: int) -> None:
    c = opened()
    with pytest.raises(ProtocolViolation):
        c.receive(data)
    assert goaway_code(c) == code


def test_request_with_continuation_padding_and_body() -> None:
    c = opened()
    req = block()
    c.receive(frame(HEADERS, 0x8, 1, b"\x03" + req[:5] + b"pad")
              + frame(CONTINUATION, END_HEADERS, 1, req[5:]))
    kind, _sid, headers, _end = c.events[0]
    assert kind == "request" and isinstance(headers, dict) and headers[b":path"] == b"/t.T/Echo"
    c.receive(frame(DATA, 0x8 | END_STREAM, 1, b"\x02" + b"body" + b"\0\0"))
    assert c.events[-1] == ("data", 1, b"body", True)
    # Stream ids must increase: reusing 1 for a new request is a connection error.
    c.send_headers(1, b"\x88", end=True)
    with pytest.raises(ProtocolViolation):
        c.receive(frame(HEADERS, END_HEADERS, 1, block()))


def test_data_after_end_stream_resets_only_that_stream() -> None:
    c = opened()
    c.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, block()))
    c.receive(frame(DATA, 0, 1, b"late"))
    assert ("reset", 1, None, False) in c.events
    assert any(f[0] == RST_STREAM and f[3] == struct.pack(">I", http2.STREAM_CLOSED)
               for f in c.sent())
    c.receive(frame(HEADERS, END_HEADERS, 3, block()))  # connection still fine
    assert c.events[-1][:2] == ("request", 3)


def test_stream_limit_refuses_extra_streams() -> None:
    c = opened()
    for i in range(http2.MAX_STREAMS + 1):
        c.receive(frame(HEADERS, END_HEADERS, 2 * i + 1, block()))
    refused = [f for f in c.sent() if f[0] == RST_STREAM]
    assert refused == [(RST_STREAM, 0, 2 * http2.MAX_STREAMS + 1,
                        struct.pack(">I", http2.REFUSED_STREAM))]
    assert sum(1 for e in c.events if e[0] == "request") == http2.MAX_STREAMS


def test_send_respects_both_windows_and_frame_size() -> None:
    c = opened()
    c.receive(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 100)))
    c.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, block()))
    c.sent()
    assert c.sendable(1) == 100
    c.send_data(1, b"a" * 100)
    assert c.sendable(1) == 0
    c.receive(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 50000)))
    assert ("window", 1, None, False) in c.events
    assert c.sendable(1) == 50000
    # The connection window (65,535 - 100) is now the smaller one.
    c.receive(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 200000)))
    assert c.sendable(1) == 65535 - 100
    c.send_data(1, b"b" * 40000)
    sizes = [len(f[3]) for f in c.sent() if f[0] == DATA]
    assert sizes == [100, 16384, 16384, 40000 - 2 * 16384]
    assert c.sendable(99) is None


def test_connection_window_reopens_only_as_data_is_consumed() -> None:
    """The client may send one connection window; more only after ``consumed``."""
    c = opened()
    c.receive(frame(SETTINGS, ACK, 0, b""))
    chunk = b"x" * 16384
    per_stream = http2.STREAM_WINDOW // 16384  # whole frames that fit one stream window
    sent = 0
    sid = 1
    while sent + 16384 * per_stream <= http2.CONN_WINDOW:
        c.receive(frame(HEADERS, END_HEADERS, sid, block()))
        for _ in range(per_stream):
            c.receive(frame(DATA, 0, sid, chunk))
        sent += 16384 * per_stream
        sid += 2
    assert not [f for f in c.sent() if f[0] == WINDOW_UPDATE], "window reopened before consumption"
    c.receive(frame(HEADERS, END_HEADERS, sid, block()))
    with pytest.raises(ProtocolViolation):
        c.receive(frame(DATA, 0, sid, b"y" * (http2.CONN_WINDOW - sent + 1)
                        if http2.CONN_WINDOW - sent + 1 <= 16384 else chunk)
                  + frame(DATA, 0, sid, chunk))
    assert goaway_code(c) == http2.FLOW_CONTROL_ERROR
    c = opened()
    c.receive(frame(HEADERS, END_HEADERS, 1, block()) + frame(DATA, 0, 1, chunk))
    c.consumed(16384)
    updates = [f for f in c.sent() if f[0] == WINDOW_UPDATE and f[2] == 0]
    assert updates == [(WINDOW_UPDATE, 0, 0, struct.pack(">I", 16384))]


def test_stream_window_is_one_message_and_enforced() -> None:
    c = Recorder(stream_window=1029, conn_window=65535)
    assert any(f[0] == SETTINGS and struct.pack(">HI", 0x4, 1029) in f[3] for f in c.sent())
    c.receive(PREFACE + frame(SETTINGS, 0, 0, b"") + frame(SETTINGS, ACK, 0, b""))
    c.receive(frame(HEADERS, END_HEADERS, 1, block()) + frame(DATA, 0, 1, b"x" * 1029))
    with pytest.raises(ProtocolViolation):
        c.receive(frame(DATA, 0, 1, b"x"))
    assert goaway_code(c) == http2.FLOW_CONTROL_ERROR
    # Before our SETTINGS is acknowledged the client may use the default window.
    c = Recorder(stream_window=1029, conn_window=65535)
    c.receive(PREFACE + frame(SETTINGS, 0, 0, b""))
    c.receive(frame(HEADERS, END_HEADERS, 1, block()) + frame(DATA, 0, 1, b"x" * 16384))
    assert c.events[-1][0] == "data"


def test_fuzzed_input_only_ever_raises_connection_errors() -> None:
    """Random and mutated frame sequences: never any other exception, never a hang."""
    rng = random.Random(20261124)
    good = [frame(HEADERS, END_HEADERS, 1, block()),
            frame(DATA, END_STREAM, 1, b"\0\0\0\0\1x"),
            frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 1000)),
            frame(PING, 0, 0, b"abcdefgh"),
            frame(WINDOW_UPDATE, 0, 0, b"\0\0\1\0"),
            frame(RST_STREAM, 0, 1, b"\0\0\0\x08")]
    errors = 0
    for _ in range(20000):
        c = Recorder()
        data = bytearray(PREFACE + b"".join(rng.choice(good) for _ in range(rng.randint(1, 6))))
        for _ in range(rng.randint(0, 4)):
            i = rng.randrange(24, len(data))
            data[i] = rng.randrange(256)
        if rng.random() < 0.2:
            data += rng.randbytes(rng.randint(1, 64))
        try:
            # Fed in random slices, as a socket would deliver it.
            pos = 0
            while pos < len(data):
                step = rng.randint(1, 40)
                c.receive(bytes(data[pos:pos + step]))
                pos += step
        except ProtocolViolation:
            errors += 1
            assert any(f[0] == GOAWAY for f in c.sent())
    assert 0 < errors < 20000


def test_trailers_on_a_stream_we_reset_are_ignored() -> None:
    """A client still sending when we answered early (e.g. too large) is not an error."""
    c = opened()
    c.receive(frame(HEADERS, END_HEADERS, 1, block()))
    c.send_headers(1, b"\x88", end=True)  # answered before the client finished
    assert any(f[0] == RST_STREAM for f in c.sent())
    c.receive(frame(DATA, 0, 1, b"more") + frame(HEADERS, END_HEADERS | END_STREAM, 1, block()))
    c.receive(frame(HEADERS, END_HEADERS, 3, block()))
    assert c.events[-1][:2] == ("request", 3)


def test_a_header_list_over_the_limit_ends_the_connection() -> None:
    """hpack raises mid-block and may have half-updated its table: GOAWAY(COMPRESSION_ERROR),
    never a refused stream on a connection whose decoder no longer matches the client's."""
    c = opened()
    enc = hpack.Encoder()
    big = bytes(enc.encode([*REQUEST, ("x-pad", "a" * 9000), ("x-pad2", "b" * 9000)]))
    with pytest.raises(ProtocolViolation):
        c.receive(frame(HEADERS, END_HEADERS, 1, big[:16384]) if len(big) <= 16384 else
                  frame(HEADERS, 0, 1, big[:16384]) + frame(CONTINUATION, END_HEADERS, 1, big[16384:]))
    assert goaway_code(c) == http2.COMPRESSION_ERROR
    assert not [e for e in c.events if e[0] == "request"]


@pytest.mark.parametrize("name, flood", [
    ("empty CONTINUATION", lambda: [frame(HEADERS, 0, 1, block()[:3])]
     + [frame(CONTINUATION, 0, 1, b"")] * 5000),
    ("empty DATA", lambda: [frame(HEADERS, END_HEADERS, 1, block())]
     + [frame(DATA, 0, 1, b"")] * 5000),
    ("rapid reset", lambda: [frame(HEADERS, END_HEADERS, 2 * i + 1, block())
                             + frame(RST_STREAM, 0, 2 * i + 1, b"\0\0\0\x08") for i in range(5000)]),
    ("PRIORITY", lambda: [frame(2, 0, 1, b"\0\0\0\0\x10")] * 5000),
    ("unknown frames", lambda: [frame(0xEE, 0, 0, b"")] * 5000),
])
def test_floods_of_cheap_frames_get_enhance_your_calm(name: str, flood: Any) -> None:
    c = opened()
    frames = flood()
    with pytest.raises(ProtocolViolation):
        for i in range(0, len(frames), 50):
            c.receive(b"".join(frames[i:i + 50]))
    assert goaway_code(c) == http2.ENHANCE_YOUR_CALM
    assert c.calm_spent() > http2.CALM_BURST - 1


def test_a_steady_trickle_of_cheap_frames_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real client resets or pings now and then: the bucket refills with time."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # the module http2 reads it from
    c = opened()
    for i in range(3 * http2.CALM_BURST):
        c.receive(frame(HEADERS, END_HEADERS, 2 * i + 1, block())
                  + frame(RST_STREAM, 0, 2 * i + 1, b"\0\0\0\x08"))
        now[0] += 1.0 / (http2.CALM_RATE / 2)
    assert not [f for f in c.sent() if f[0] == GOAWAY]
