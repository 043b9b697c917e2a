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
RST_STREAM or disconnect, flow control in both directions, and no message
compression (never advertised, so conforming clients never send it).

Hardening: ``http2.py`` checks every frame against the RFC 9113 rules its
docstring lists (a protocol error closes the connection with GOAWAY); non-POST
is 405 and a non-gRPC content type 415; at most ``http2.MAX_STREAMS`` concurrent
streams per connection; request messages over ``max_message`` bytes are
refused before they are buffered further; a client that stops reading has
its own reading paused, so it cannot make the daemon buffer answers without
bound; the per-uid connection cap of the old front is kept.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc

from badged.listener.http2 import (
    INTERNAL_ERROR,
    NO_ERROR,
    ProtocolViolation,
    ServerConnection,
    header_block,
    literal,
)
from badged.listener.peers import PeerCredentials, PeerRegistry, read_peer
from badged.listener.sockets import bind_unix

_logger = logging.getLogger(__name__)

_GRPC = b"application/grpc"
_RESERVED = frozenset({b"content-type", b"te", b"grpc-timeout", b"grpc-encoding",
                       b"grpc-accept-encoding"})
_RESPONSE_BLOCK = header_block(((b":status", b"200"), (b"content-type", b"application/grpc")))
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
        return self._stream.reset

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
        "buf",
        "conn",
        "deadline",
        "finished",
        "handler",
        "headers_sent",
        "id",
        "metadata",
        "path",
        "remote_closed",
        "reset",
        "task",
        "window",
    )

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        self.id = stream_id
        self.conn = conn
        self.path = ""
        self.handler: Handler = None
        self.metadata: tuple[tuple[str, str | bytes], ...] = ()
        self.buf = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.deadline: float | None = None
        self.finished = False  # we ended it (trailers sent, or reset)
        self.reset = False  # the peer reset it, or the connection went away
        self.headers_sent = False
        self.window: asyncio.Event | None = None
        self.remote_closed = False


class _Connection(ServerConnection, asyncio.Protocol):
    """One accepted client: its identity, its HTTP/2 framing, its calls."""

    def __init__(self, server: GrpcFront, channel: str) -> None:
        super().__init__()
        self.server = server
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.name: str | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self._write_paused = False
        # Made by the loop's protocol factory: remembered, because on Python
        # 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()

    # -- connection life -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server = self.server
        try:
            peer = read_peer(transport.get_extra_info("socket"), self.channel)
        except OSError as exc:
            _logger.warning("cannot read peer credentials", extra={"error": str(exc)})
            self.close()
            return
        if server.registry.connections_of(peer.uid) >= server.max_per_uid:
            _logger.warning("connection refused: per-uid limit",
                            extra={"uid": peer.uid, "limit": server.max_per_uid})
            if peer.pidfd >= 0:
                os.close(peer.pidfd)
            self.close()
            return
        self.name = server.register(peer)
        server.connections.add(self)
        self.flush()  # our SETTINGS and connection window

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in self.streams.values():
            self._abandon(stream)
        self.streams.clear()
        if self.name is not None:
            self.server.registry.release(self.name)
            self.name = None
        self.server.connections.discard(self)
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Tell the client no new calls are taken here (GOAWAY); calls in flight go on."""
        if not self.closed:
            self.goaway(NO_ERROR)
            self.flush()

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests.
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def flush(self) -> None:
        out = self.out
        if out and self.transport is not None and not self.closed:
            self.transport.write(bytes(out))
        out.clear()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.name is None:
            return
        try:
            self.receive(data)
        except ProtocolViolation as exc:
            _logger.info("HTTP/2 protocol error; closing connection",
                         extra={"error": str(exc), "peer": self.name})
            self.flush()  # the GOAWAY
            self.close()
            return
        except Exception:
            _logger.exception("front failed on a connection; closing it",
                              extra={"peer": self.name})
            self.goaway(INTERNAL_ERROR)
            self.flush()
            self.close()
            return
        self.flush()

    # -- framing hooks ---------------------------------------------------

    def on_request(self, sid: int, headers: Sequence[tuple[bytes, bytes]], end: bool) -> None:
        stream = _Stream(self, sid)
        self.streams[sid] = stream
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
                stream.deadline = asyncio.get_running_loop().time() + timeout
            elif key == b"grpc-encoding" and value != b"identity":
                self._fail(stream, grpc.StatusCode.UNIMPLEMENTED,
                           "message compression is not supported")
                return
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
            return
        if data:
            stream.buf += data
            if len(stream.buf) > self.server.max_message + 5:
                self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request message larger than {self.server.max_message} bytes")
                return
        if end:
            self._dispatch(stream)

    def on_reset(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            self._abandon(stream)

    def on_window(self, sid: int) -> None:
        if sid == 0:
            for stream in self.streams.values():
                if stream.window is not None:
                    stream.window.set()
        else:
            one = self.streams.get(sid)
            if one is not None and one.window is not None:
                one.window.set()

    def _dispatch(self, stream: _Stream) -> None:
        buf = stream.buf
        if len(buf) < 5 or len(buf) != 5 + int.from_bytes(buf[1:5], "big"):
            self._fail(stream, grpc.StatusCode.INTERNAL,
                       "expected exactly one request message")
            return
        if buf[0] != 0:
            self._fail(stream, grpc.StatusCode.UNIMPLEMENTED,
                       "message compression is not supported")
            return
        handler = stream.handler
        try:
            request = handler.request_deserializer(bytes(buf[5:]))
        except Exception:
            self._fail(stream, grpc.StatusCode.INTERNAL, "cannot parse the request message")
            return
        stream.buf = bytearray()
        assert self.name is not None
        ctx = ServicerContext(self.name, stream.metadata, stream)
        if handler.unary_unary is not None:
            coro = self._unary(stream, handler, request, ctx)
        elif handler.unary_stream is not None:
            coro = self._server_stream(stream, handler, request, ctx)
        else:
            self._fail(stream, grpc.StatusCode.UNIMPLEMENTED, "client streaming is not served")
            return
        self.server.call_started()
        stream.task = task = self._loop.create_task(coro)
        task.add_done_callback(self.server.call_done)

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
        try:
            if stream.deadline is None:
                payload = await body()
            else:
                async with asyncio.timeout_at(stream.deadline):
                    payload = await body()
        except grpc.aio.AbortError:
            self._end_error(stream, ctx)
            return
        except TimeoutError:
            ctx.code, ctx.details = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
            self._end_error(stream, ctx)
            return
        except asyncio.CancelledError:
            if stream.reset or self.closed:
                return  # the caller went away; nobody to answer
            raise
        except Exception:
            _logger.exception("unhandled error", extra={"method": stream.path})
            ctx.code, ctx.details = grpc.StatusCode.INTERNAL, "internal error"
            self._end_error(stream, ctx)
            return
        if ctx.code is not None and ctx.code != grpc.StatusCode.OK:
            self._end_error(stream, ctx)
            return
        await self._send(stream, payload, end=True, trailing=ctx.trailing_metadata())

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
                if room < 0:
                    return  # reset meanwhile
                if room == 0:
                    self.flush()
                    if stream.window is None:
                        stream.window = asyncio.Event()
                    stream.window.clear()
                    await stream.window.wait()
                    if stream.reset or self.closed:
                        return
                    continue
                self.send_data(sid, data[:room])
                data = data[room:]
        if end:
            stream.finished = True
            block = _OK_BLOCK + header_block(_metadata_headers(trailing)) if trailing else _OK_BLOCK
            self.send_headers(sid, block, end=True)
            self.streams.pop(sid, None)
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
        self.streams.pop(stream.id, None)
        self.flush()

    def _http_error(self, stream: _Stream, status: bytes) -> None:
        stream.finished = True
        self.send_headers(stream.id, header_block(((b":status", status),)), end=True)
        self.streams.pop(stream.id, None)

    def _abandon(self, stream: _Stream) -> None:
        stream.reset = True
        if stream.window is not None:
            stream.window.set()
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()


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


class GrpcFront:
    """Owns the public sockets and the connections on them."""

    def __init__(self, *, registry: PeerRegistry, methods: Mapping[str, Handler],
                 max_per_uid: int, max_message: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.methods = dict(methods)
        self.max_per_uid = max_per_uid
        self.max_message = max_message
        self.connections: set[_Connection] = set()
        self.active_calls = 0  # handlers running now, on all connections
        self._clock = clock
        self._last_overlap = float("-inf")  # when a call last started beside another
        self._servers: list[tuple[asyncio.Server, Path]] = []
        self._nonce = secrets.token_hex(4)
        self._counter = itertools.count()

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
