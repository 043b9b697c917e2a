"""Server side of HTTP/2 (RFC 9113) as gRPC uses it: framing, streams, flow control.

Why hand-written framing: with python-hyper's ``h2`` state machine the
transport was still ~36 % of the daemon's CPU per call (h2 builds frame
objects, re-validates, and formats every received frame for a trace log
even when logging is off; docs/performance.md). gRPC needs a small subset of
HTTP/2 and the server side of it is simple: no push, no priorities, no
server-initiated streams, one header block per direction and a tiny fixed
set of response headers. The hard, attack-prone part, HPACK decoding with
its dynamic table and Huffman code, stays in the ``hpack`` library.

Rules enforced (each a connection error with GOAWAY unless noted):
the client preface; frame size ≤ 16 KiB (we never raise MAX_FRAME_SIZE);
odd, increasing client stream ids; CONTINUATION only right after an
unfinished HEADERS on the same stream, and a header block ≤ 64 KiB before
decoding; any header block that cannot be fully decoded, a header list over
16 KiB included (COMPRESSION_ERROR: the HPACK table may be half-updated, so
the connection cannot go on); SETTINGS/PING/WINDOW_UPDATE/RST_STREAM/PRIORITY
sizes and stream-0 rules; window overflow; PUSH_PROMISE from a client.
Per stream: more than ``max_streams`` open (``on_new_stream()``; the front
counts a stream until its handler has ended) → RST_STREAM(REFUSED_STREAM);
DATA after the client ended its side → RST_STREAM(STREAM_CLOSED).

Receive flow control is *enforced*, because it is what bounds the memory a
caller can make us hold before it is authorized: a stream's window is one
request message (``stream_window``, checked at start-up to equal the message
cap plus its 5-byte prefix) and is never reopened (a unary request fits in
it); the connection window is the connection's buffer budget and reopens
only by what the owner reports ``consumed`` (a body handed to its handler or
dropped). DATA beyond either window is a FLOW_CONTROL_ERROR.

Cheap frames that cost us work but carry none (RST_STREAM from the client,
empty DATA or CONTINUATION, PRIORITY, unknown types) draw from a per-
connection token bucket (``CALM_BURST``, refilled at ``CALM_RATE``/s); an
empty bucket is GOAWAY(ENHANCE_YOUR_CALM), as nghttp2 and Go do against
rapid-reset and CONTINUATION floods.

Response header blocks are HPACK literals "without indexing" (no dynamic
table on our side), so the encoder is a few byte joins.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Iterable, Sequence

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, \
    WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, \
    STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, \
    CONNECT_ERROR, ENHANCE_YOUR_CALM = range(12)

MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE we accept (the protocol default)
MAX_WINDOW = 2**31 - 1
MAX_HEADER_BLOCK = 65536
MAX_HEADER_LIST = 16384
# For a metered caller: an encoder that uses Huffman only where it is shorter
# (grpc-core, grpc-go, nghttp2) never needs more than the list limit plus
# per-field prefixes for a list within it.
METERED_HEADER_BLOCK = MAX_HEADER_LIST + 1024
MAX_STREAMS = 100
_MAX_INDEXED_BLOCKS = 16  # distinct all-indexed header blocks remembered per connection
_HIGH_BYTES = bytes(range(0x80, 0x100))
DEFAULT_WINDOW = 65535  # the protocol's initial windows, before any SETTINGS
STREAM_WINDOW = 128 * 1024 + 5  # default SETTINGS_INITIAL_WINDOW_SIZE: one 128 KiB message
CONN_WINDOW = 4 * STREAM_WINDOW  # default connection receive window (buffer budget)
WINDOW_UPDATE_STEP = 16384  # reopen the connection window once this much was consumed
CALM_BURST = 1000  # cheap frames a connection may send in a burst...
CALM_RATE = 200.0  # ...and per second after that


class ProtocolViolation(Exception):
    """Violation that ends the connection with GOAWAY(code)."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


def frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((ftype, flags))
            + stream.to_bytes(4, "big") + payload)


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman."""
    return b"\x00" + _int(len(name), 7, 0) + name + _int(len(value), 7, 0) + value


def header_block(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    out = bytearray()
    for name, value in headers:
        if name == b":status" and value == b"200":
            out += b"\x88"  # static table index 8
        else:
            out += literal(name, value)
    return bytes(out)


def check_windows(stream_window: int, conn_window: int, max_streams: int) -> None:
    """Invariants of the receive windows, checked whenever a connection is made.

    The connection window can only be raised by WINDOW_UPDATE, never below
    the protocol default. (That a connection can be granted at least one
    stream window is the front's invariant: ``FrontLimits.check``.)
    """
    if not 1 <= max_streams <= 2**31 - 1:
        raise ValueError(f"max_streams {max_streams} out of range")
    if not 5 < stream_window <= MAX_WINDOW:
        raise ValueError(f"stream window {stream_window} out of range")
    if not DEFAULT_WINDOW <= conn_window <= MAX_WINDOW:
        raise ValueError(f"connection window {conn_window} out of range")


class StreamState:
    """Flow-control and life of one stream, as far as framing is concerned."""

    __slots__ = ("id", "recv_window", "remote_closed", "send_window")

    def __init__(self, stream_id: int, send_window: int, recv_window: int = STREAM_WINDOW) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.remote_closed = False


class ServerConnection:
    """HTTP/2 server framing; subclasses get ``on_*`` calls and send with ``send_*``.

    Output accumulates in ``out`` and is written by the owner (``flush``),
    so one socket write carries everything a batch of input caused.
    """

    def __init__(self, *, stream_window: int = STREAM_WINDOW, conn_window: int = CONN_WINDOW,
                 max_streams: int = MAX_STREAMS) -> None:
        check_windows(stream_window, conn_window, max_streams)
        self.out = bytearray()
        self._in = bytearray()
        self.stream_window = stream_window
        self.conn_window = conn_window
        self.max_streams = max_streams
        self._recv_window = DEFAULT_WINDOW  # what the client may still send, connection-wide
        self._settings_acked = False
        self._calm_tokens = float(CALM_BURST)
        self._calm_at = time.monotonic()
        self._preface = False
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = MAX_HEADER_LIST
        self._indexed: dict[bytes, tuple[tuple[bytes, bytes], ...]] = {}
        self._state: dict[int, StreamState] = {}
        self._last_stream = 0
        self._continuation: tuple[int, int, bytearray] | None = None  # sid, flags, block
        # Largest header block accepted before decoding (the front lowers it for callers
        # it meters: decoding Huffman costs ~0.4 µs a byte of the event loop).
        self.max_header_block = MAX_HEADER_BLOCK
        self.peer_window = 65535  # connection send window
        self._peer_initial = 65535
        self.peer_max_frame = MAX_FRAME
        self._recv_consumed = 0
        self.goaway_sent = False
        self._reset_ids: set[int] = set()  # recent streams we reset (bounded)
        self._reset_order: deque[int] = deque()
        self.out += frame(SETTINGS, 0, 0, struct.pack(">HIHIHI", 0x3, max_streams,
                                                      0x4, stream_window, 0x6, MAX_HEADER_LIST))
        if conn_window > DEFAULT_WINDOW:
            self.out += frame(WINDOW_UPDATE, 0, 0, (conn_window - DEFAULT_WINDOW).to_bytes(4, "big"))
            self._recv_window = conn_window

    # -- hooks -----------------------------------------------------------

    def on_request(self, sid: int, headers: Sequence[tuple[bytes, bytes]], end: bool) -> None:
        raise NotImplementedError

    def on_data(self, sid: int, data: bytes, end: bool) -> None:
        raise NotImplementedError

    def on_reset(self, sid: int) -> None:
        raise NotImplementedError

    def on_window(self, sid: int) -> None:
        """Send window opened on ``sid`` (0: the whole connection)."""

    def on_new_stream(self, sid: int) -> bool:
        """A new stream is about to open: False refuses it (REFUSED_STREAM).

        Here: at most ``max_streams`` open. The front counts a stream until its
        handler has ended, and adds the caller's per-uid budget.
        """
        return len(self._state) < self.max_streams

    # -- flow control and abuse counters ---------------------------------

    def consumed(self, n: int) -> None:
        """``n`` received DATA bytes are no longer held: let the client send as much again.

        The front overrides this to grant from the caller's per-uid budget instead.
        """
        self._recv_consumed += n
        if self._recv_consumed >= WINDOW_UPDATE_STEP:
            self.grant(self._recv_consumed)
            self._recv_consumed = 0

    @property
    def recv_window(self) -> int:
        """What the client may still send on the connection (its receive window)."""
        return self._recv_window

    def grant(self, n: int) -> None:
        """Open the connection receive window by ``n`` bytes (WINDOW_UPDATE)."""
        self.out += frame(WINDOW_UPDATE, 0, 0, n.to_bytes(4, "big"))
        self._recv_window += n

    def calm_spent(self) -> float:
        """Tokens drawn from the cheap-frame bucket (for tests and diagnostics)."""
        return CALM_BURST - self._calm_tokens

    def calm(self, what: str) -> None:
        """Draw one token for a cheap frame; none left is GOAWAY(ENHANCE_YOUR_CALM)."""
        now = time.monotonic()
        tokens = min(float(CALM_BURST), self._calm_tokens + (now - self._calm_at) * CALM_RATE)
        self._calm_at = now
        if tokens < 1.0:
            raise ProtocolViolation(ENHANCE_YOUR_CALM, f"too many {what}")
        self._calm_tokens = tokens - 1.0

    # -- input -----------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Feed bytes; raises ``ProtocolViolation`` (GOAWAY already queued)."""
        buf = self._in
        buf += data
        try:
            if not self._preface:
                if len(buf) < 24:
                    if PREFACE[:len(buf)] != bytes(buf):
                        raise ProtocolViolation(PROTOCOL_ERROR, "bad connection preface")
                    return
                if buf[:24] != PREFACE:
                    raise ProtocolViolation(PROTOCOL_ERROR, "bad connection preface")
                del buf[:24]
                self._preface = True
            pos = 0
            end = len(buf)
            while end - pos >= 9:
                length = int.from_bytes(buf[pos:pos + 3], "big")
                if length > MAX_FRAME:
                    raise ProtocolViolation(FRAME_SIZE_ERROR, "frame larger than 16 KiB")
                if end - pos - 9 < length:
                    break
                ftype = buf[pos + 3]
                flags = buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[pos + 9:pos + 9 + length])
                pos += 9 + length
                self._frame(ftype, flags, sid, payload)
            del buf[:pos]
        except ProtocolViolation as exc:
            self.goaway(exc.code, str(exc).encode("ascii", "replace"))
            raise

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._continuation is not None and ftype != CONTINUATION:
            raise ProtocolViolation(PROTOCOL_ERROR, "expected CONTINUATION")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            self._more_headers(flags, sid, payload)
        elif ftype == SETTINGS:
            self._settings(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == RST_STREAM:
            if sid == 0 or len(payload) != 4:
                raise ProtocolViolation(PROTOCOL_ERROR if sid == 0 else FRAME_SIZE_ERROR,
                                       "bad RST_STREAM")
            self._idle_check(sid)
            self.calm("stream resets")
            st = self._state.pop(sid, None)
            if st is not None:
                self.on_reset(sid)
        elif ftype == PING:
            if sid != 0 or len(payload) != 8:
                raise ProtocolViolation(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self.out += frame(PING, ACK, 0, payload)
        elif ftype == PRIORITY:
            if sid == 0:
                raise ProtocolViolation(PROTOCOL_ERROR, "PRIORITY on stream 0")
            self.calm("PRIORITY frames")
            if len(payload) != 5:
                self.reset(sid, FRAME_SIZE_ERROR)
        elif ftype == GOAWAY:
            if sid != 0:
                raise ProtocolViolation(PROTOCOL_ERROR, "GOAWAY on a stream")
            # The client opens no more streams; it closes the socket when done.
        elif ftype == PUSH_PROMISE:
            raise ProtocolViolation(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        else:
            self.calm("unknown frames")  # otherwise ignored (RFC 9113 §5.5)

    def _idle_check(self, sid: int) -> None:
        if sid > self._last_stream:
            raise ProtocolViolation(PROTOCOL_ERROR, "frame on an idle stream")

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolViolation(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # flow control counts padding too
        self._recv_window -= size
        if self._recv_window < 0:
            raise ProtocolViolation(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolViolation(PROTOCOL_ERROR, "bad padding")
            payload = payload[1:len(payload) - payload[0]]
        end = bool(flags & END_STREAM)
        if not payload and not end:
            self.calm("empty DATA frames")
        st = self._state.get(sid)
        if st is None:
            self._idle_check(sid)
            self.consumed(size)  # a stream we already closed or reset: dropped
            return
        st.recv_window -= size
        if st.recv_window < 0:
            raise ProtocolViolation(FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        if size != len(payload):
            self.consumed(size - len(payload))  # padding is never held
        if st.remote_closed:
            self.consumed(len(payload))
            self.reset(sid, STREAM_CLOSED)
            self.on_reset(sid)
            return
        if end:
            st.remote_closed = True
        self.on_data(sid, payload, end)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0 or not sid & 1:
            raise ProtocolViolation(PROTOCOL_ERROR, "bad stream id for HEADERS")
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ProtocolViolation(PROTOCOL_ERROR, "bad padding")
            payload = payload[1:len(payload) - payload[0]]
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ProtocolViolation(FRAME_SIZE_ERROR, "short PRIORITY block")
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(sid, flags, payload)
        else:
            self._continuation = (sid, flags, bytearray(payload))

    def _more_headers(self, flags: int, sid: int, payload: bytes) -> None:
        pending = self._continuation
        if pending is None or pending[0] != sid:
            raise ProtocolViolation(PROTOCOL_ERROR, "unexpected CONTINUATION")
        if not payload and not flags & END_HEADERS:
            self.calm("empty CONTINUATION frames")
        pending[2].extend(payload)
        if len(pending[2]) > self.max_header_block:
            raise ProtocolViolation(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._continuation = None
            self._header_block(sid, pending[1], bytes(pending[2]))

    def _decode(self, block: bytes) -> tuple[tuple[bytes, bytes], ...]:
        """HPACK-decode ``block``, entirely or not at all (COMPRESSION_ERROR).

        hpack raises mid-block (a header list over the limit, a bad index),
        after part of the block may have changed its dynamic table: the
        client's encoder and our decoder are then out of step, and every later
        block on the connection could decode to other headers than were sent.
        So any failure ends the connection (RFC 9113 §4.3).

        A client that indexes its headers (grpcio does) sends the same few
        bytes on every call, each a one-byte *indexed* field. Such a block
        cannot change the decoder's dynamic table (RFC 7541 §6.1), so while
        the table is unchanged it decodes to the same headers: they are
        remembered instead of decoded again (~5 % of a call's time on the
        event loop). Any other block may change the table and forgets them.
        An all-high-bit block that decodes is one-byte indexed fields only: an
        integer that continues (0xFF) must end in a byte below 0x80.
        """
        known = self._indexed.get(block)
        if known is not None:
            return known
        try:
            decoded = self._decoder.decode(block, raw=True)
        except Exception as exc:  # hpack's own errors, and anything its decoder trips on
            self._indexed.clear()
            raise ProtocolViolation(COMPRESSION_ERROR, f"HPACK: {type(exc).__name__}") from None
        headers = tuple([(bytes(k), bytes(v)) for k, v in decoded])
        if block.translate(None, _HIGH_BYTES):
            self._indexed.clear()  # literals, maybe indexed, or a table size update
        elif len(self._indexed) < _MAX_INDEXED_BLOCKS:
            self._indexed[block] = headers
        return headers

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode(block)
        end = bool(flags & END_STREAM)
        st = self._state.get(sid)
        if sid <= self._last_stream:
            if st is None:
                if sid in self._reset_ids:
                    # A stream we reset while the client was still sending:
                    # ignore (RFC 9113 §5.4.2). The block was decoded above,
                    # so the HPACK state stays in sync.
                    return
                raise ProtocolViolation(STREAM_CLOSED, "HEADERS on a closed stream")
            if st.remote_closed:
                raise ProtocolViolation(STREAM_CLOSED, "HEADERS after END_STREAM")
            # Trailers from the client: gRPC unary clients send none; accept the end.
            if not end:
                raise ProtocolViolation(PROTOCOL_ERROR, "trailers without END_STREAM")
            st.remote_closed = True
            self.on_data(sid, b"", True)
            return
        self._last_stream = sid
        if self.goaway_sent:
            return  # after GOAWAY no new streams are processed
        if not self.on_new_stream(sid):
            self.reset(sid, REFUSED_STREAM)
            self.calm("refused streams")
            return
        # Before the client acknowledged our SETTINGS it may still use the
        # protocol's default window (RFC 9113 §6.9.2).
        window = (self.stream_window if self._settings_acked
                  else max(self.stream_window, DEFAULT_WINDOW))
        st = StreamState(sid, self._peer_initial, window)
        st.remote_closed = end
        self._state[sid] = st
        self.on_request(sid, headers, end)

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ProtocolViolation(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolViolation(FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            self._settings_acked = True
            return
        if len(payload) % 6:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "SETTINGS length")
        for i in range(0, len(payload), 6):
            ident, value = struct.unpack_from(">HI", payload, i)
            if ident == 0x2 and value > 1:
                raise ProtocolViolation(PROTOCOL_ERROR, "bad ENABLE_PUSH")
            if ident == 0x4:
                if value > MAX_WINDOW:
                    raise ProtocolViolation(FLOW_CONTROL_ERROR, "bad INITIAL_WINDOW_SIZE")
                delta = value - self._peer_initial
                self._peer_initial = value
                for st in self._state.values():
                    st.send_window += delta
                    if st.send_window > MAX_WINDOW:
                        raise ProtocolViolation(FLOW_CONTROL_ERROR, "window overflow")
                if delta > 0:
                    self.on_window(0)
            elif ident == 0x5:
                if not MAX_FRAME <= value <= 2**24 - 1:
                    raise ProtocolViolation(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_max_frame = value
            # HEADER_TABLE_SIZE limits an encoder table we never use; the rest
            # (MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE) bind clients only.
        self.out += _SETTINGS_ACK

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ProtocolViolation(PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.peer_window += inc
            if self.peer_window > MAX_WINDOW:
                raise ProtocolViolation(FLOW_CONTROL_ERROR, "connection window overflow")
            self.on_window(0)
            return
        st = self._state.get(sid)
        if st is None:
            self._idle_check(sid)
            return
        if inc == 0:
            self.reset(sid, PROTOCOL_ERROR)
            self.on_reset(sid)
            return
        st.send_window += inc
        if st.send_window > MAX_WINDOW:
            self.reset(sid, FLOW_CONTROL_ERROR)
            self.on_reset(sid)
            return
        self.on_window(sid)

    # -- output ----------------------------------------------------------

    def send_headers(self, sid: int, block: bytes, *, end: bool) -> None:
        """One header block (ours are small: always one frame)."""
        self.out += frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, block)
        if end:
            self._local_end(sid)

    def sendable(self, sid: int) -> int | None:
        """How many DATA bytes may go out on ``sid`` now (≤ 0: wait); None: the stream is gone.

        A window can be negative (the client lowered INITIAL_WINDOW_SIZE after
        we sent): that means wait for WINDOW_UPDATE, like zero.
        """
        st = self._state.get(sid)
        if st is None:
            return None
        return min(self.peer_window, st.send_window)

    def send_data(self, sid: int, data: bytes | memoryview) -> None:
        """Queue DATA within the windows the caller checked with ``sendable``."""
        st = self._state[sid]
        n = len(data)
        st.send_window -= n
        self.peer_window -= n
        step = self.peer_max_frame
        for i in range(0, n, step):
            self.out += frame(DATA, 0, sid, bytes(data[i:i + step]))

    def reset(self, sid: int, code: int) -> None:
        self.out += frame(RST_STREAM, 0, sid, code.to_bytes(4, "big"))
        self._state.pop(sid, None)
        self._reset_ids.add(sid)
        self._reset_order.append(sid)
        if len(self._reset_order) > 256:
            self._reset_ids.discard(self._reset_order.popleft())

    def goaway(self, code: int = NO_ERROR, debug: bytes = b"") -> None:
        """GOAWAY once; ``debug`` is the reason a client can log (RFC 9113 §6.8)."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self.out += frame(GOAWAY, 0, 0, self._last_stream.to_bytes(4, "big")
                              + code.to_bytes(4, "big") + debug[:256])

    def _local_end(self, sid: int) -> None:
        st = self._state.get(sid)
        if st is None:
            return
        if st.remote_closed:
            del self._state[sid]
        else:
            # Our answer is complete; the client is still sending: stop it.
            self.reset(sid, NO_ERROR)


_SETTINGS_ACK = frame(SETTINGS, ACK, 0, b"")
