"""The gRPC server on the public sockets: gRPC over HTTP/2, terminated in the front.

Why badged does not put grpcio's server behind a byte relay any more
(FINDINGS §1 design, measured in docs/performance.md): every call then crossed
the relay twice, grpc.aio's poller thread, and the C-core's own queues, and
the daemon spent ~450 µs of CPU per sequential call on transport alone, more
than the handler. Terminating HTTP/2 on the accepted socket itself

* ties identity to the connection directly: SO_PEERCRED and the pidfd are
  read from the socket the request arrives on, and no abstract-name registry
  or private socket exists that anything else could dial;
* costs ~70-100 µs of CPU per call (our framing in ``http2.py``, HPACK
  decoding by ``hpack``), with no extra thread competing for the GIL.

What it serves is exactly what the generated ``add_*Servicer_to_server``
functions register (``MethodTable`` captures them) behind the same
``ErrorBoundary``: unary and server-streaming methods, gRPC framing,
``grpc-timeout`` deadlines, trailers-only errors, cancellation on
RST_STREAM or disconnect, flow control in both directions, and gzip/deflate
request messages (``grpc-accept-encoding`` is sent; answers are never
compressed).

Hardening: ``http2.py`` checks every frame against the RFC 9113 rules its
docstring lists (a protocol error closes the connection with GOAWAY); non-POST
is 405 and a non-gRPC content type 415; at most ``http2.MAX_STREAMS`` concurrent
streams per connection; request messages over ``max_message`` bytes are
refused before they are buffered further; a client that stops reading has
its own reading paused, so it cannot make the daemon buffer answers without
bound. Issue 16 (hostile local users) added, with the numbers in
``budget.FrontLimits``: receive windows that match the message cap and are
enforced; per-uid budgets of connections, streams, buffered bytes and
handlers (smallest for uids that match no policy rule), evicting that uid's
oldest idle connection or stalled body at a cap; a global connection cap
below the fd limit with a reserve for the admin socket; timeouts for the
first request, a request body, an idle connection and an answer the client
does not take (GOAWAY with the reason as debug data); a stream slot is held
until its handler has ended; nothing is signed for a call that is gone or
late (``callstate``); accept() failures pause accepting and are logged once
per interval.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import itertools
import logging
import os
import secrets
import termios
import time
import types
import urllib.parse
import zlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import replace
from pathlib import Path
from time import perf_counter
from typing import Any, cast

import grpc

from badged.listener.budget import (
    Budget,
    CpuMeter,
    FrontLimits,
    Ledger,
    UidUsage,
    connection_cap,
    min_buffered,
    raise_fd_limit,
)
from badged.listener.callstate import CURRENT_CALL, CallGone
from badged.listener.http2 import (
    DEFAULT_WINDOW,
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    METERED_HEADER_BLOCK,
    NO_ERROR,
    WINDOW_UPDATE_STEP,
    ProtocolViolation,
    ServerConnection,
    header_block,
    literal,
)
from badged.listener.logthrottle import Throttled
from badged.listener.peers import PeerCredentials, PeerRegistry, peer_uid, read_peer
from badged.listener.sockets import bind_unix

_logger = logging.getLogger(__name__)

_GRPC = b"application/grpc"
_RESERVED = frozenset({b"content-type", b"te", b"grpc-timeout", b"grpc-encoding",
                       b"grpc-accept-encoding"})
ACCEPT_ENCODING = b"identity,deflate,gzip"
_RESPONSE_BLOCK = header_block(((b":status", b"200"), (b"content-type", b"application/grpc"),
                                (b"grpc-accept-encoding", ACCEPT_ENCODING)))
# zlib wbits: "deflate" is the zlib format (RFC 1950) in grpc-core and grpc-js,
# raw DEFLATE in some others; "gzip" RFC 1952. 47 detects zlib or gzip headers.
_WBITS = {b"gzip": 31, b"deflate": 47}
_OK_BLOCK = header_block(((b"grpc-status", b"0"),))
_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3,
                  ord("u"): 1e-6, ord("n"): 1e-9}
# RFC 3986 unreserved plus what the gRPC spec leaves unescaped in grpc-message.
_MESSAGE_SAFE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"

Handler = Any  # grpc.RpcMethodHandler: typed loosely, grpcio's stubs are generic


class MethodTable:
    """Collects what the generated ``add_*_to_server`` functions register.

    Quacks like the two ``grpc.aio.Server`` methods they call, so the servicers
    are wired exactly as they would be on a grpcio server.
    """

    def __init__(self) -> None:
        self.methods: dict[str, Handler] = {}

    @property
    def as_server(self) -> grpc.aio.Server:
        """This table typed as what the generated registration functions take."""
        return cast(grpc.aio.Server, self)

    def add_generic_rpc_handlers(self, handlers: Iterable[object]) -> None:
        """Ignored: generated code also calls ``add_registered_method_handlers``."""

    def add_registered_method_handlers(self, service: str,
                                       handlers: Mapping[str, Handler]) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler

    async def intercepted(self, interceptors: Sequence[grpc.aio.ServerInterceptor],
                          ) -> dict[str, Handler]:
        """Apply server interceptors once per method, at start-up, not per call."""
        table: dict[str, Handler] = {}
        for method, handler in self.methods.items():
            for interceptor in reversed(interceptors):
                handler = await interceptor.intercept_service(
                    _constant(handler), cast(grpc.HandlerCallDetails, _Details(method)))
            table[method] = handler
        return table


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[tuple[str, str], ...] = ()


def _constant(handler: Handler) -> Callable[[object], Awaitable[Handler]]:
    async def continuation(_details: object) -> Handler:
        return handler
    return continuation


class ServicerContext:
    """The part of ``grpc.aio.ServicerContext`` that badged's handlers use."""

    __slots__ = ("_metadata", "_peer", "_stream", "_trailing", "code", "details")

    @property
    def caller(self) -> PeerCredentials | None:
        """The kernel-attested peer fixed when this call's connection was accepted.

        Handed over as the object itself, not looked up by a name: the
        snapshot (and what later requests learned about it, such as an exec
        after connect) travels with the call. ``None`` once the connection
        has closed, because closing releases the peer's pidfd and a closed
        descriptor number may already belong to something else.
        """
        return self._stream.conn.peer

    def __init__(self, peer: str, metadata: tuple[tuple[str, str | bytes], ...],
                 stream: _Stream) -> None:
        self._peer = peer
        self._metadata = metadata
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self._stream = stream

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def time_remaining(self) -> float | None:
        deadline = self._stream.deadline
        if deadline is None:
            return None
        return max(0.0, deadline - asyncio.get_running_loop().time())

    def cancelled(self) -> bool:
        """True once the caller reset the call or went away: nothing it asked for is wanted."""
        return self._stream.reset or self._stream.conn.closed

    def done(self) -> bool:
        return self._stream.finished

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str | bytes]] = ()) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort with OK")
        self.code = code
        self.details = details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    async def write(self, message: Any) -> None:
        """Server-streaming handlers that write instead of yielding (health Watch)."""
        await self._stream.conn.send_message(self._stream, message)


class _Stream:
    __slots__ = (
        "blocked_since",
        "buf",
        "committed",
        "conn",
        "deadline",
        "encoding",
        "expired",
        "finished",
        "handler",
        "headers_sent",
        "id",
        "metadata",
        "opened",
        "path",
        "remote_closed",
        "reset",
        "retired",
        "task",
        "window",
    )

    def __init__(self, conn: _Connection, stream_id: int, opened: float) -> None:
        self.id = stream_id
        self.conn = conn
        self.path = ""
        self.handler: Handler = None
        self.metadata: tuple[tuple[str, str | bytes], ...] = ()
        self.buf = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.deadline: float | None = None
        self.encoding: bytes | None = None  # grpc-encoding other than identity
        self.finished = False  # we ended it (trailers sent, or reset)
        self.reset = False  # the peer reset it, or the connection went away
        self.retired = False  # its slot and budget are given back (handler ended)
        self.committed = False  # something was made for it: finish (audit) whatever happens
        self.expired = False  # its deadline passed before it committed
        self.headers_sent = False
        self.window: asyncio.Event | None = None
        self.blocked_since: float | None = None  # waiting for the client's window
        self.remote_closed = False
        self.opened = opened

    def wanted(self) -> bool:
        """Still worth working for: not reset, connection open, deadline not passed."""
        if self.reset or self.conn.closed:
            return False
        return self.deadline is None or self.conn._loop.time() < self.deadline

    def commit(self) -> None:
        self.committed = True

    def catch_up(self) -> None:
        self.conn.catch_up()

    def gone(self) -> bool:
        return self.reset or self.conn.closed

    def call_done(self, _task: object) -> None:
        """The handler's task ended (done callback): free the slot and the budget."""
        conn = self.conn
        conn.server.active_calls -= 1
        usage = conn.usage
        if usage is not None:
            usage.handlers -= 1
        conn._retire(self)


class _Connection(ServerConnection, asyncio.Protocol):
    """One accepted client: its identity, its HTTP/2 framing, its calls."""

    def __init__(self, server: GrpcFront, channel: str) -> None:
        limits = server.limits
        # The connection window starts at the protocol default; more is granted
        # from the uid's budget once we know the uid (connection_made, _top_up).
        super().__init__(stream_window=limits.stream_window, conn_window=DEFAULT_WINDOW,
                         max_streams=limits.conn_streams)
        self.server = server
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.name: str | None = None
        # The caller as the kernel described it at accept; what handlers get
        # (ServicerContext.caller). Cleared before close() releases its pidfd.
        self.peer: PeerCredentials | None = None
        self.uid = -1
        self.usage: UidUsage[_Connection, _Stream] | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        # Set for a uid that is metered (matches no rule): its loop time is charged.
        self.meter: CpuMeter | None = None
        self._blocks = 0  # why reading is paused: _WRITE_BLOCKED | _HELD
        self.tarpit_timer: asyncio.TimerHandle | None = None
        self._fd = -1  # the socket's descriptor, for catch_up
        self._receiving = False  # in data_received: flush once at its end
        self._write_paused = False
        self._paused_at = 0.0
        # Made by the loop's protocol factory: remembered, because on Python
        # 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self.accepted = self._loop.time()
        self._top_up_below = limits.conn_buffer - WINDOW_UPDATE_STEP
        self.activity = 0  # requests so far (the sweeper compares it to see idleness)
        self._idle_mark = -1
        self._idle_since = self.accepted

    # -- connection life -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        started = perf_counter()
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server = self.server
        sock = transport.get_extra_info("socket")
        try:
            uid = peer_uid(sock)  # admission first: the /proc reads only for admitted callers
        except OSError as exc:
            server.refusals.note("cannot read peer credentials", error=str(exc))
            self.close()
            return
        meter = server.meter_for(self.channel, uid)
        usage = server.admit(self, uid, held=meter is not None and meter.timer is not None)
        if usage is None:
            if meter is not None:
                server.charge(uid, meter, perf_counter() - started + ACCEPT_COST)
                if server.tarpit(self, uid):
                    return  # refused, but told so only later (GrpcFront.tarpit)
            self.flush()  # SETTINGS and the GOAWAY with the reason
            self.close()
            return
        try:
            peer = read_peer(sock, self.channel)
        except OSError as exc:
            server.refusals.note("cannot read peer credentials", error=str(exc))
            self.close()
            server.ledger.drop_if_empty(self.channel, uid)
            return
        self.uid = peer.uid
        self.usage = usage
        self._fd = sock.fileno()
        # asyncio reads up to 256 KiB a time: a fresh bytes object that size per
        # read, above glibc's mmap threshold, so an mmap/munmap pair per request
        # (~17 µs, measured). READ_SIZE stays below it; a bigger request is read
        # in a few pieces.
        transport.max_size = READ_SIZE  # type: ignore[attr-defined]
        server.ledger.add(usage, self.channel, peer.uid, self)
        usage.exposure += DEFAULT_WINDOW  # the client may send that much already
        self.name = server.register(peer)
        self.peer = peer
        server.connections.add(self)
        self._top_up()
        self.flush()  # our SETTINGS and connection window
        if meter is not None:
            self.meter = meter
            # Read a metered caller in small pieces: one read is one bounded stretch of work.
            transport.max_size = METERED_READ  # type: ignore[attr-defined]
            self.max_header_block = METERED_HEADER_BLOCK  # decoding one is one short stretch
            if meter.timer is not None:
                self.block_reading(_HELD)
            server.charge(uid, meter, perf_counter() - started + ACCEPT_COST)

    def refuse(self, reason: str) -> None:
        """Turn away a new connection with a reason the client can log."""
        self.goaway(ENHANCE_YOUR_CALM, reason.encode())

    def expire(self, code: int, reason: str) -> None:
        """End the connection now: GOAWAY(code, reason), then close."""
        if self.closed:
            return
        self.server.expirations.note(reason, uid=self.uid)
        self.goaway(code, reason.encode())
        self.flush()
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def end_tarpit(self) -> None:
        """A refusal held back (GrpcFront.tarpit) is sent now: SETTINGS, GOAWAY, close."""
        self.flush()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.tarpit_timer is not None:
            self.tarpit_timer.cancel()
            self.tarpit_timer = None
            self.server.untarpit(self.uid)
        for stream in list(self.streams.values()):
            self._abandon(stream)
            if stream.task is None:
                self._retire(stream)
        if self.usage is not None:
            self.usage.exposure -= self.recv_window  # held bytes were released above
            self.server.ledger.remove(self.channel, self.uid, self)
        self.peer = None
        if self.name is not None:
            self.server.registry.release(self.name)
            self.name = None
        self.server.connections.discard(self)
        transport = self.transport
        if transport is not None:
            transport.close()
            if transport.get_write_buffer_size():
                # close() waits for buffered output to drain: a peer that never
                # reads would keep the socket and its buffer forever, outside
                # every budget. The GOAWAY gets a moment, then the socket goes.
                self._loop.call_later(CLOSE_GRACE_S, transport.abort)

    def shutdown(self) -> None:
        """Tell the client no new calls are taken here (GOAWAY); calls in flight go on."""
        if not self.closed:
            self.goaway(NO_ERROR, b"server shutting down")
            self.flush()

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests.
        self._write_paused = True
        self._paused_at = self._loop.time()
        self.block_reading(_WRITE_BLOCKED)

    def resume_writing(self) -> None:
        self._write_paused = False
        self.unblock_reading(_WRITE_BLOCKED)

    def block_reading(self, why: int) -> None:
        """Stop reading this client (its answers pile up, or its uid is over its CPU share)."""
        if not self._blocks and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._blocks |= why

    def unblock_reading(self, why: int) -> None:
        """Read again once no reason to pause is left."""
        if self._blocks & why:
            self._blocks &= ~why
            if not self._blocks and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def flush(self) -> None:
        if self._receiving:
            return  # data_received writes once, after the whole batch of input
        out = self.out
        transport = self.transport
        # A transport whose send failed is closing before connection_lost runs;
        # writing to it would log "socket.send() raised exception." each time.
        if out and transport is not None and not self.closed and not transport.is_closing():
            transport.write(bytes(out))
        out.clear()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.name is None:
            return
        meter = self.meter
        if meter is None:
            self._input(data)
            return
        started = perf_counter()
        self._input(data)
        self.server.charge(self.uid, meter, perf_counter() - started)

    def _input(self, data: bytes) -> None:
        self._receiving = True
        try:
            self.receive(data)
        except ProtocolViolation as exc:
            self._receiving = False
            self.server.refusals.note("HTTP/2 protocol error; closing connection",
                                      error=str(exc), uid=self.uid)
            self.flush()  # the GOAWAY
            self.close()
            return
        except Exception:
            self._receiving = False
            _logger.exception("front failed on a connection; closing it",
                              extra={"peer": self.name})
            self.goaway(INTERNAL_ERROR)
            self.flush()
            self.close()
            return
        self._receiving = False
        self.flush()

    def catch_up(self) -> None:
        """Process input the client has already sent, now (before a signature; loop thread).

        One non-blocking read of the socket asyncio would read later anyway
        (asyncio then finds it empty). Not while reading is paused (the
        client is over a budget or not reading its answers) or mid-input.
        """
        if self.closed or self._blocks or self._receiving or self._fd < 0:
            return
        try:
            # FIONREAD first: nothing waiting is the common case, and a failed read
            # costs twice as much (an exception). An end of file is left to asyncio.
            if fcntl.ioctl(self._fd, termios.FIONREAD, _FOUR) == _FOUR:  # zero bytes
                return
            data = os.read(self._fd, 65536)
        except OSError:  # an error asyncio will see itself
            return
        if data:
            self.data_received(data)

    def charge(self, cost: float) -> None:
        """A metered caller's handler step took ``cost`` seconds of the loop."""
        meter = self.meter
        if meter is not None:
            self.server.charge(self.uid, meter, cost)

    def sweep(self, now: float, limits: FrontLimits) -> None:
        """Timeouts, checked about once a second by the front (not on the call path)."""
        if self.closed or self.usage is None:
            return
        if self.activity == 0:
            if now - self.accepted > limits.preface_timeout:
                self.expire(NO_ERROR, f"no request within {limits.preface_timeout:g}s")
            return
        if self._write_paused and now - self._paused_at > limits.send_timeout:
            self.expire(ENHANCE_YOUR_CALM, f"answers not read for {limits.send_timeout:g}s")
            return
        if not self.streams:
            if self._idle_mark != self.activity:
                self._idle_mark = self.activity
                self._idle_since = now
            elif now - self._idle_since > limits.idle_timeout:
                self.expire(NO_ERROR, f"idle for {limits.idle_timeout:g}s")
            return
        self._idle_mark = -1
        for stream in list(self.streams.values()):
            if stream.task is None and not stream.finished:
                if stream.deadline is not None and now >= stream.deadline:
                    self._fail(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                elif now - stream.opened > limits.body_timeout:
                    self.expire(ENHANCE_YOUR_CALM,
                                f"request body not received within {limits.body_timeout:g}s")
                    return
            elif (stream.blocked_since is not None
                  and now - stream.blocked_since > limits.send_timeout):
                self.expire(ENHANCE_YOUR_CALM,
                            f"answer not taken within {limits.send_timeout:g}s (flow control)")
                return
        self.flush()

    # -- framing hooks ---------------------------------------------------

    def consumed(self, n: int) -> None:
        """Bytes no longer held go back to the uid's budget, then maybe to this connection."""
        usage = self.usage
        if usage is None:
            return
        usage.exposure -= n
        if not self.closed and self._recv_window <= self._top_up_below:
            self._top_up()

    def _top_up(self) -> None:
        """Grant this connection window up to ``conn_buffer``, as far as the uid's budget allows."""
        usage = self.usage
        if usage is None or self.closed:
            return
        want = self.server.limits.conn_buffer - self.recv_window
        # The initial windows of connections the uid may still open are spoken for.
        unopened = usage.budget.connections - len(usage.connections)
        room = usage.budget.buffered - usage.exposure - max(0, unopened) * DEFAULT_WINDOW
        grant = min(want, room)
        if grant >= WINDOW_UPDATE_STEP or (grant > 0 and grant == want):
            usage.exposure += grant
            self.grant(grant)

    def on_new_stream(self, sid: int) -> bool:
        # Streams whose handler still runs hold their slot even after a reset,
        # so MAX_CONCURRENT_STREAMS bounds the work in flight.
        usage = self.usage
        if usage is None or len(self.streams) >= self.max_streams:
            return False
        if usage.streams >= usage.budget.streams and not self._evict_waiting(usage):
            self.server.refusals.note("stream refused: per-uid stream budget", uid=self.uid)
            return False
        return True

    def _evict_waiting(self, usage: UidUsage[_Connection, _Stream]) -> bool:
        """Reset this uid's oldest stream still waiting for its body; False if there is none.

        A scan of at most the uid's stream budget, only when that budget is full.
        """
        victim: _Stream | None = None
        for conn in usage.connections:
            for stream in conn.streams.values():
                if stream.task is None and not stream.finished and (
                        victim is None or stream.opened < victim.opened):
                    victim = stream
        if victim is None:
            return False
        victim.conn._reset_stream(victim, "per-uid budget: oldest unfinished request")
        return True

    def _reset_stream(self, stream: _Stream, reason: str) -> None:
        self.server.refusals.note("request dropped", reason=reason, uid=self.uid)
        if not stream.finished:
            stream.finished = True
            self.reset(stream.id, ENHANCE_YOUR_CALM)
        self._abandon(stream)
        if stream.task is None:
            self._retire(stream)
        self.flush()

    def on_request(self, sid: int, headers: Sequence[tuple[bytes, bytes]], end: bool) -> None:
        usage = self.usage
        assert usage is not None
        # Stream age only matters to the body timeout (1 s sweeps): the sweeper's clock.
        stream = _Stream(self, sid, self.server.now)
        self.streams[sid] = stream
        usage.streams += 1
        self.activity += 1
        method = path = ctype = b""
        metadata: list[tuple[str, str | bytes]] = []
        for key, value in headers:
            if key[:1] == b":":
                if key == b":method":
                    method = value
                elif key == b":path":
                    path = value
                continue
            if key == b"content-type":
                ctype = value
            elif key == b"grpc-timeout":
                timeout = _parse_timeout(value)
                if timeout is None:
                    self._fail(stream, grpc.StatusCode.INVALID_ARGUMENT, "malformed grpc-timeout")
                    return
                if timeout <= 0:
                    self._fail(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                    return
                stream.deadline = self._loop.time() + timeout
            elif key == b"grpc-encoding" and value != b"identity":
                if value not in _WBITS:
                    self._fail(stream, grpc.StatusCode.UNIMPLEMENTED,
                               "message encoding not supported (identity, deflate, gzip are)")
                    return
                stream.encoding = value
            if key in _RESERVED:
                continue
            name = key.decode("ascii", "replace")
            if name.endswith("-bin"):
                try:
                    metadata.append((name, base64.b64decode(value + b"==")))
                except ValueError:
                    continue
            else:
                metadata.append((name, value.decode("latin-1")))
        if method != b"POST":
            self._http_error(stream, b"405")
            return
        if not (ctype == _GRPC or ctype.startswith(_GRPC + b"+") or ctype.startswith(_GRPC + b";")):
            self._http_error(stream, b"415")
            return
        stream.path = path.decode("ascii", "replace")
        stream.handler = self.server.methods.get(stream.path)
        if stream.handler is None:
            self._fail(stream, grpc.StatusCode.UNIMPLEMENTED,
                       f"method not found: {stream.path[:100]}")
            return
        stream.metadata = tuple(metadata)
        if end:
            self._dispatch(stream)

    def on_data(self, sid: int, data: bytes, end: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.finished or stream.handler is None:
            self.consumed(len(data))  # dropped, not held
            return
        if data:
            n = len(data)
            stream.buf += data
            usage = self.usage
            assert usage is not None
            usage.buffered += n
            have = len(stream.buf)
            if have >= 5:
                # The prefix declares the size: refuse at once rather than wait
                # for a body the stream window (one message) would not admit.
                declared = int.from_bytes(stream.buf[1:5], "big")
                if declared > self.server.max_message:
                    self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"request message larger than {self.server.max_message} bytes")
                    return
                if have > 5 + declared:
                    self._fail(stream, grpc.StatusCode.INTERNAL,
                               "expected exactly one request message")
                    return
            if self.recv_window <= self._top_up_below:
                self._top_up()  # bodies in progress: more window, if the uid has budget left
        if end:
            self._dispatch(stream)

    def on_reset(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            self._abandon(stream)
            if stream.task is None:
                self._retire(stream)

    def on_window(self, sid: int) -> None:
        if sid == 0:
            for stream in self.streams.values():
                if stream.window is not None:
                    stream.window.set()
        else:
            one = self.streams.get(sid)
            if one is not None and one.window is not None:
                one.window.set()

    def _release(self, stream: _Stream) -> None:
        """The stream's buffered request bytes are no longer held: reopen the windows."""
        n = len(stream.buf)
        if n:
            stream.buf = bytearray()
            self.consumed(n)
            if self.usage is not None:
                self.usage.buffered -= n

    def _retire(self, stream: _Stream) -> None:
        """Give back the stream's slot and budget, once: its handler (if any) has ended."""
        if stream.retired:
            return
        stream.retired = True
        if stream.buf:
            self._release(stream)
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        if self.usage is not None:
            self.usage.streams -= 1
        # No cycles left for the collector: stream → task → coroutine → stream.
        stream.task = None
        stream.window = None
        stream.handler = None

    def _dispatch(self, stream: _Stream) -> None:
        buf = stream.buf
        if len(buf) < 5 or len(buf) != 5 + int.from_bytes(buf[1:5], "big"):
            self._fail(stream, grpc.StatusCode.INTERNAL,
                       "expected exactly one request message")
            return
        usage = self.usage
        assert usage is not None
        message: bytes | bytearray = buf[5:]
        if buf[0] != 0:
            if buf[0] != 1 or stream.encoding is None:
                self._fail(stream, grpc.StatusCode.INTERNAL,
                           "compressed message without a grpc-encoding")
                return
            inflated = _inflate(bytes(message), stream.encoding, self.server.max_message)
            if inflated is None:
                self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request message larger than {self.server.max_message} bytes "
                           "or not decodable")
                return
            message = inflated
        if stream.deadline is not None and self._loop.time() >= stream.deadline:
            self._fail(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            return
        if usage.handlers >= usage.budget.handlers:
            self.server.refusals.note("call refused: per-uid handler budget", uid=self.uid)
            self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       "too many calls in flight for this user")
            return
        handler = stream.handler
        try:
            request = handler.request_deserializer(bytes(message))
        except Exception:
            self._fail(stream, grpc.StatusCode.INTERNAL, "cannot parse the request message")
            return
        self._release(stream)
        assert self.name is not None
        ctx = ServicerContext(self.name, stream.metadata, stream)
        if handler.unary_unary is not None:
            coro = self._unary(stream, handler, request, ctx)
        elif handler.unary_stream is not None:
            coro = self._server_stream(stream, handler, request, ctx)
        else:
            self._fail(stream, grpc.StatusCode.UNIMPLEMENTED, "client streaming is not served")
            return
        if self.meter is not None:
            coro = _metered(coro, self.charge)
        self.server.call_started()
        usage.handlers += 1
        stream.task = task = self._loop.create_task(coro)
        task.add_done_callback(stream.call_done)

    # -- calls -----------------------------------------------------------

    async def _unary(self, stream: _Stream, handler: Handler, request: Any,
                     ctx: ServicerContext) -> None:
        async def body() -> bytes:
            return cast(bytes, handler.response_serializer(
                await handler.unary_unary(request, ctx)))

        await self._run(stream, ctx, body)

    async def _server_stream(self, stream: _Stream, handler: Handler, request: Any,
                             ctx: ServicerContext) -> None:
        async def body() -> None:
            result = handler.unary_stream(request, ctx)
            if isinstance(result, AsyncIterator):
                async for message in result:
                    await self.send_message(stream, message)
            else:
                await result  # handlers that write through context.write()

        await self._run(stream, ctx, body)

    async def _run(self, stream: _Stream, ctx: ServicerContext,
                   body: Callable[[], Awaitable[bytes | None]]) -> None:
        """Run a call under its deadline, then end the stream: answer or status."""
        CURRENT_CALL.set(stream)  # this task's own context: see callstate
        # The deadline cancels the call unless it has committed (see callstate):
        # asyncio.timeout_at would also cancel one that is writing its audit record.
        timer = (None if stream.deadline is None
                 else self._loop.call_at(stream.deadline, self._deadline_passed, stream))
        try:
            payload = await body()
        except grpc.aio.AbortError:
            self._end_error(stream, ctx)
            return
        except asyncio.CancelledError as exc:
            if stream.reset or self.closed:
                return  # the caller went away; nobody to answer
            if stream.expired or isinstance(exc, CallGone):
                ctx.code, ctx.details = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
                self._end_error(stream, ctx)
                return
            raise
        except Exception:
            _logger.exception("unhandled error", extra={"method": stream.path})
            ctx.code, ctx.details = grpc.StatusCode.INTERNAL, "internal error"
            self._end_error(stream, ctx)
            return
        finally:
            if timer is not None:
                timer.cancel()
        if ctx.code is not None and ctx.code != grpc.StatusCode.OK:
            self._end_error(stream, ctx)
            return
        await self._send(stream, payload, end=True, trailing=ctx.trailing_metadata())

    def _deadline_passed(self, stream: _Stream) -> None:
        task = stream.task
        if stream.committed or task is None or task.done():
            return
        stream.expired = True
        task.cancel()

    async def send_message(self, stream: _Stream, message: Any) -> None:
        if stream.reset or stream.finished or self.closed:
            raise asyncio.CancelledError()
        await self._send(stream, stream.handler.response_serializer(message), end=False)

    async def _send(self, stream: _Stream, payload: bytes | None, *, end: bool,
                    trailing: Sequence[tuple[str, str | bytes]] = ()) -> None:
        if stream.reset or stream.finished or self.closed:
            return
        sid = stream.id
        if not stream.headers_sent:
            self.send_headers(sid, _RESPONSE_BLOCK, end=False)
            stream.headers_sent = True
        if payload is not None:
            data = memoryview(len(payload).to_bytes(5, "big") + payload)  # flag 0: uncompressed
            while data:
                room = self.sendable(sid)
                if room is None:
                    return  # reset meanwhile
                if room <= 0:  # a window can go negative (SETTINGS): wait, like zero
                    self.flush()
                    if stream.window is None:
                        stream.window = asyncio.Event()
                    stream.window.clear()
                    stream.blocked_since = self._loop.time()
                    await stream.window.wait()
                    stream.blocked_since = None
                    if stream.reset or self.closed:
                        return
                    continue
                self.send_data(sid, data[:room])
                data = data[room:]
        if end:
            stream.finished = True
            block = _OK_BLOCK + header_block(_metadata_headers(trailing)) if trailing else _OK_BLOCK
            self.send_headers(sid, block, end=True)
        self.flush()

    def _end_error(self, stream: _Stream, ctx: ServicerContext) -> None:
        code = ctx.code or grpc.StatusCode.UNKNOWN
        self._finish_error(stream, code, ctx.details, ctx.trailing_metadata())

    def _fail(self, stream: _Stream, code: grpc.StatusCode, details: str) -> None:
        self._finish_error(stream, code, details, ())

    def _finish_error(self, stream: _Stream, code: grpc.StatusCode, details: str,
                      trailing: Sequence[tuple[str, str | bytes]]) -> None:
        if stream.reset or stream.finished or self.closed:
            return
        stream.finished = True
        message = urllib.parse.quote(details[:512], safe=_MESSAGE_SAFE).encode()
        block = (literal(b"grpc-status", str(code.value[0]).encode())
                 + literal(b"grpc-message", message)
                 + header_block(_metadata_headers(trailing)))
        if not stream.headers_sent:
            block = _RESPONSE_BLOCK + block  # trailers-only answer
        self.send_headers(stream.id, block, end=True)
        if stream.task is None:
            self._retire(stream)  # no handler ran; with one, its end retires the stream
        self.flush()

    def _http_error(self, stream: _Stream, status: bytes) -> None:
        stream.finished = True
        self.send_headers(stream.id, header_block(((b":status", status),)), end=True)
        self._retire(stream)

    def _abandon(self, stream: _Stream) -> None:
        stream.reset = True
        if stream.window is not None:
            stream.window.set()
        if stream.task is not None and not stream.task.done() and not stream.committed:
            stream.task.cancel()  # a committed call finishes its audit record first


@types.coroutine
def _metered_steps(coro: Coroutine[Any, Any, None],
                   charge: Callable[[float], None]) -> Generator[Any, Any, None]:
    """Run ``coro``, charging the loop time of each of its steps (a metered caller's handler)."""
    value: Any = None
    error: BaseException | None = None
    while True:
        started = perf_counter()
        try:
            yielded = coro.send(value) if error is None else coro.throw(error)
        except StopIteration:
            charge(perf_counter() - started)
            return
        except BaseException:
            charge(perf_counter() - started)
            raise
        charge(perf_counter() - started)
        value = error = None
        try:
            value = yield yielded
        except BaseException as exc:  # cancellation included: handed to the handler
            error = exc


async def _metered(coro: Coroutine[Any, Any, None], charge: Callable[[float], None]) -> None:
    await _metered_steps(coro, charge)


def _inflate(data: bytes, encoding: bytes, cap: int) -> bytes | None:
    """Decompress a request message; None if it is over ``cap`` bytes or not valid.

    The output is bounded while decompressing (``max_length``), so a small
    "zip bomb" never expands in memory beyond the message cap.
    """
    attempts = (_WBITS[encoding], -15) if encoding == b"deflate" else (_WBITS[encoding],)
    for wbits in attempts:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(data, cap + 1)
        except zlib.error:
            continue
        if len(out) > cap or inflater.unconsumed_tail or not inflater.eof:
            return None
        return out
    return None


def _metadata_headers(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    out = []
    for key, value in metadata:
        name = key.lower()
        if isinstance(value, bytes):
            if not name.endswith("-bin"):
                continue
            raw = base64.b64encode(value).rstrip(b"=")
        else:
            raw = value.encode("ascii", "replace")
        out.append((name.encode("ascii"), raw))
    return tuple(out)


def _parse_timeout(value: bytes) -> float | None:
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    if unit is None:
        return None
    return int(value[:-1]) * unit


# How long after two calls last overlapped the daemon still counts as busy
# for solo(): see GrpcFront.solo.
SOLO_QUIET_S = 0.1
# How long a closed connection may still flush its last frames (the GOAWAY)
# to a peer before its socket is dropped.
CLOSE_GRACE_S = 1.0
# Loop time an accept costs before connection_made runs (asyncio's accept and
# transport set-up, which the front cannot time; an estimate): charged to a
# metered uid on top of what connection_made itself measures.
ACCEPT_COST = 60e-6
# A metered caller's socket is read this much at a time (asyncio's default is
# 256 KiB): one read, and the work it causes, stays a short stretch. Sized for
# the smallest frames: a rapid-reset stream is ~45 bytes and ~25 µs of work,
# so 8 KiB is ~180 streams, a few ms.
METERED_READ = 8 * 1024
# Everyone else's socket is read this much at a time: below glibc's default
# mmap threshold (128 KiB), so a read's buffer comes from the heap. asyncio's
# default (256 KiB) cost an mmap, a page fault and a munmap per read, ~17 µs
# of a ~20 µs recv (tests/unit/test_front_reads.py).
READ_SIZE = 64 * 1024
# A metered uid's refused connection is told so (GOAWAY) only after this long,
# without being read meanwhile: a client that reconnects at once after each
# refusal then reconnects every TARPIT_S, not as fast as it can (an accept, a
# set-up and a tear-down each time, for the daemon and for the host's CPU).
TARPIT_S = 2.0
TARPIT_PER_UID = 64
_FOUR = bytes(4)  # FIONREAD's result buffer
# Why a connection's reading is paused (bits of _Connection._blocks).
_WRITE_BLOCKED = 1
_HELD = 2


class GrpcFront:
    """Owns the public sockets and the connections on them."""

    def __init__(self, *, registry: PeerRegistry, methods: Mapping[str, Handler],
                 max_per_uid: int, max_message: int,
                 clock: Callable[[], float] = time.monotonic,
                 limits: FrontLimits | None = None,
                 is_bound: Callable[[int], bool] | None = None) -> None:
        if limits is None:
            limits = FrontLimits(max_message=max_message, conn_buffer=max(
                FrontLimits.conn_buffer, max_message + 5))
        if limits.bound.connections != max_per_uid:
            bound = replace(limits.bound, connections=max_per_uid)
            unbound = replace(limits.unbound,
                              connections=min(max_per_uid, limits.unbound.connections))
            limits = replace(limits, bound=replace(bound, buffered=max(
                bound.buffered, min_buffered(bound.connections, limits))), unbound=unbound)
        if limits.max_message != max_message:
            raise ValueError("the front's windows must match the message cap")
        limits.check()  # windows match the message cap; every budget fits one call
        self.limits = limits
        self.registry = registry
        self.methods = dict(methods)
        self.max_per_uid = max_per_uid
        self.max_message = max_message
        # Unknown callers get the small budget until policy says they may match.
        self._is_bound = is_bound or (lambda uid: True)
        self.ledger: Ledger[_Connection, _Stream] = Ledger()
        self.max_connections = connection_cap(raise_fd_limit(), limits)
        self.connections: set[_Connection] = set()
        self.active_calls = 0  # handlers running now, on all connections
        self._clock = clock
        self._last_overlap = float("-inf")  # when a call last started beside another
        self._servers: list[tuple[asyncio.Server, Path]] = []
        self._nonce = secrets.token_hex(4)
        self._counter = itertools.count()
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.now = 0.0  # loop time, refreshed by every sweep: a coarse clock for stream age
        self._previous_handler: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None
        self.refusals = Throttled(_logger)
        self.expirations = Throttled(_logger)
        self.accept_failures = Throttled(_logger, level=logging.WARNING)
        self.evictions = 0
        # Loop time of uids that match no rule (CpuMeter): one bucket each, kept
        # while not full (so reconnecting does not refill it), and one for all.
        self._meters: dict[int, CpuMeter] = {}
        self.unbound_meter = CpuMeter(limits.unbound_cpu, limits.cpu_burst * 2, perf_counter())
        self.holds = 0  # times a metered uid was held (for tests and diagnostics)
        # Refused connections of metered uids kept a while before the GOAWAY (tarpit):
        # one descriptor each, so their number comes out of the connection cap.
        self.tarpit_max = min(1024, self.max_connections // 8)
        self.max_connections -= (self.tarpit_max + 1) // 2
        self._tarpitted: dict[int, int] = {}
        self.tarpitted = 0

    def budget_for(self, channel: str, uid: int) -> Budget:
        limits = self.limits
        if channel == "admin":
            return limits.bound
        return limits.bound if self._is_bound(uid) else limits.unbound

    def meter_for(self, channel: str, uid: int) -> CpuMeter | None:
        """The CPU meter of a uid that matches no rule; None for everyone else (unmetered)."""
        if channel == "admin" or self._is_bound(uid):
            return None
        meter = self._meters.get(uid)
        if meter is None:
            meter = self._meters[uid] = CpuMeter(self.limits.unbound_cpu_per_uid,
                                                 self.limits.cpu_burst, perf_counter())
        return meter

    def charge(self, uid: int, meter: CpuMeter, cost: float) -> None:
        """``cost`` seconds of loop time went to metered ``uid``: hold it if over its share.

        Held means its connections are not read (nor its new ones) until its
        bucket and the shared one are positive again; its handlers already
        running finish. Anything it sent meanwhile waits in its own socket
        buffer, and a client blocked on a full buffer costs nobody anything.
        """
        now = perf_counter()
        wait = meter.spend(cost, now)
        shared = self.unbound_meter.spend(cost, now)
        if shared > wait:
            wait = shared
        if wait > 0.0 and meter.timer is None:
            self.holds += 1
            meter.timer = self._loop_of().call_later(wait, self._unhold, uid, meter)
            usage = self.ledger.usage.get(("workload", uid))
            if usage is not None:
                for conn in usage.connections:
                    conn.block_reading(_HELD)

    def tarpit(self, conn: _Connection, uid: int) -> bool:
        """Hold back the refusal of ``conn`` (a metered uid's) for TARPIT_S, unread; False if
        the tarpit is full (for this uid or in all) and it must be refused at once."""
        mine = self._tarpitted.get(uid, 0)
        if mine >= TARPIT_PER_UID or self.tarpitted >= self.tarpit_max:
            return False
        self._tarpitted[uid] = mine + 1
        self.tarpitted += 1
        conn.uid = uid
        conn.block_reading(_HELD)
        conn.tarpit_timer = self._loop_of().call_later(TARPIT_S, conn.end_tarpit)
        return True

    def untarpit(self, uid: int) -> None:
        self.tarpitted -= 1
        left = self._tarpitted.get(uid, 1) - 1
        if left:
            self._tarpitted[uid] = left
        else:
            self._tarpitted.pop(uid, None)

    def _unhold(self, uid: int, meter: CpuMeter) -> None:
        meter.timer = None
        usage = self.ledger.usage.get(("workload", uid))
        if usage is not None:
            for conn in list(usage.connections):
                conn.unblock_reading(_HELD)

    def _loop_of(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def admit(self, conn: _Connection, uid: int, *,
              held: bool = False) -> UidUsage[_Connection, _Stream] | None:
        """Make room for a new connection of ``uid``, or refuse it (None, reason queued).

        At the uid's cap, its oldest idle connection goes; at the socket's cap,
        the oldest idle connection of the uid holding the most. Only if none is
        idle is the newcomer refused. A ``held`` uid (over its CPU share) evicts
        nothing: its newcomer is refused, the cheapest answer (an eviction
        costs a set-up and a tear-down, and the evicted client reconnects).
        """
        channel = conn.channel
        usage = self.ledger.get(channel, uid, self.budget_for(channel, uid))
        if len(usage.connections) >= usage.budget.connections and (
                held or not self._evict_idle(usage)):
            self.refusals.note("connection refused: per-uid limit", uid=uid,
                               limit=usage.budget.connections)
            conn.refuse(f"per-uid connection limit ({usage.budget.connections})")
            self.ledger.drop_if_empty(channel, uid)
            return None
        cap = (self.limits.admin_connections if channel == "admin"
               else max(1, self.max_connections - self.limits.admin_connections))
        if self.ledger.channel_total.get(channel, 0) >= cap:
            heaviest = self.ledger.heaviest(channel)
            if heaviest is None or not self._evict_idle(heaviest):
                self.refusals.note("connection refused: server connection limit", uid=uid,
                                   limit=cap)
                conn.refuse(f"server connection limit ({cap})")
                self.ledger.drop_if_empty(channel, uid)
                return None
        return usage

    def _evict_idle(self, usage: UidUsage[_Connection, _Stream]) -> bool:
        for victim in usage.connections:
            if not victim.streams:
                self.evictions += 1
                victim.expire(NO_ERROR, "evicted: oldest idle connection at a connection limit")
                return True
        return False

    async def _sweep(self) -> None:
        """Timeouts of every connection, once per ``sweep_interval`` (off the call path)."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        while True:
            await asyncio.sleep(limits.sweep_interval)
            now = self.now = loop.time()
            if self._meters:
                clock = perf_counter()
                for uid, meter in list(self._meters.items()):
                    if meter.full(clock) and ("workload", uid) not in self.ledger.usage:
                        del self._meters[uid]
            for conn in list(self.connections):
                try:
                    conn.sweep(now, limits)
                except Exception:
                    _logger.exception("front sweep failed on a connection; closing it")
                    conn.close()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """accept() out of fds/memory: asyncio pauses accepting for a second and retries by
        itself; log that once per interval with a count instead of a traceback each time."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                                      errno.ENOMEM):
            self.accept_failures.note("accept failed; accepting paused and retried",
                                      error=errno.errorcode.get(exc.errno or 0, "?"),
                                      connections=len(self.connections))
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    def call_started(self) -> None:
        if self.active_calls:
            self._last_overlap = self._clock()
        self.active_calls += 1

    def call_done(self, _task: object) -> None:
        self.active_calls -= 1

    def calls_in_flight(self) -> int:
        """Handlers running now (read from the audit writer thread: a hint)."""
        return self.active_calls

    def solo(self) -> bool:
        """One call alone, and none beside another for a while: a blocking wait is safe.

        The audit log fsyncs a lone call's record on the loop thread (no
        thread hand-offs: sequential latency). Under load that must not
        happen: a momentary lull between 16 clients' calls would make one
        call "alone", and its fsync, slow when the disk's journal thread is
        short of CPU (3 to 26 ms measured at 16 clients), would stall every
        call in flight. So a lull counts only after SOLO_QUIET_S without any
        overlap; a sequential client never overlaps and keeps the fast path.
        """
        return (self.active_calls <= 1
                and self._clock() - self._last_overlap >= SOLO_QUIET_S)

    def register(self, peer: PeerCredentials) -> str:
        """Name a connection for ``context.peer()`` and the registry."""
        name = (f"unix:{peer.channel}#{self._nonce}-{next(self._counter)}"
                f",pid={peer.pid},uid={peer.uid}")
        self.registry.register(name, peer)
        return name

    async def serve(self, path: Path, *, channel: str, mode: int, group: int | None = None) -> None:
        """Listen on ``path`` with exactly ``mode`` (and group), then accept."""
        sock = bind_unix(path, mode=mode, group=group)
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self.now = loop.time()
            self._sweeper = loop.create_task(self._sweep())
            self._previous_handler = loop.get_exception_handler()
            loop.set_exception_handler(self._loop_exception)
        server = await loop.create_unix_server(lambda: _Connection(self, channel), sock=sock)
        self._servers.append((server, path))
        _logger.info("listening", extra={"socket": str(path), "channel": channel,
                                         "mode": f"{mode:04o}"})

    async def stop_accepting(self) -> None:
        """Stop accepting, remove the socket files, and send GOAWAY on live links."""
        for server, path in self._servers:
            server.close()
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        for server, _ in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for conn in list(self.connections):
            conn.shutdown()

    async def drain(self, grace: float) -> None:
        """Let calls in flight finish, for at most ``grace`` seconds."""
        tasks = [s.task for c in self.connections for s in c.streams.values()
                 if s.task is not None and not s.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)

    def close_links(self) -> None:
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
