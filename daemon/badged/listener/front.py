"""The gRPC server on the public sockets: HTTP/2 (python-hyper ``h2``) in the front.

Why badged does not put grpcio's server behind a byte relay any more
(FINDINGS §1 design, measured in docs/performance.md): every call then crossed
the relay twice, grpc.aio's poller thread, and the C-core's own queues, and
the daemon spent ~450 µs of CPU per sequential call on transport alone, more
than the handler. Terminating HTTP/2 on the accepted socket itself

* ties identity to the connection directly: SO_PEERCRED and the pidfd are
  read from the socket the request arrives on, and no abstract-name registry
  or private socket exists that anything else could dial;
* costs ~100-180 µs of CPU per call (pure-Python framing, HPACK by ``hpack``),
  with no extra thread competing for the GIL.

What it serves is exactly what the generated ``add_*Servicer_to_server``
functions register (``MethodTable`` captures them) behind the same
``ErrorBoundary``: unary and server-streaming methods, gRPC framing,
``grpc-timeout`` deadlines, trailers-only errors, cancellation on
RST_STREAM or disconnect, flow control in both directions, and no message
compression (never advertised, so conforming clients never send it).

Hardening: ``h2`` validates every frame and header block (a protocol error
closes the connection with GOAWAY); at most ``MAX_STREAMS`` concurrent
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
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from badged.listener.peers import PeerCredentials, PeerRegistry, read_peer
from badged.listener.sockets import bind_unix

_logger = logging.getLogger(__name__)

MAX_STREAMS = 100
_GRPC = b"application/grpc"
_RESERVED = frozenset({b"content-type", b"te", b"grpc-timeout", b"grpc-encoding",
                       b"grpc-accept-encoding"})
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_OK_TRAILERS = ((b"grpc-status", b"0"),)
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

    __slots__ = ("_metadata", "_peer", "_stream", "_trailing", "code", "deadline", "details")

    def __init__(self, peer: str, metadata: tuple[tuple[str, str | bytes], ...],
                 stream: _Stream, deadline: float | None) -> None:
        self._peer = peer
        self._metadata = metadata
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self._stream = stream
        self.deadline = deadline

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
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

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


class _Connection(asyncio.Protocol):
    """One accepted client: its identity, its HTTP/2 state, its calls."""

    def __init__(self, server: GrpcFront, channel: str) -> None:
        self.server = server
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.h2: h2.connection.H2Connection | None = None
        self.name: str | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self._write_paused = False

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
        conn = h2.connection.H2Connection(server.h2_config)
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16384,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20,
        })
        conn.initiate_connection()
        # Give the whole connection a large receive window: the per-stream
        # window and the message-size cap are what bound buffering.
        conn.increment_flow_control_window((1 << 24) - 65535)
        self.h2 = conn
        self._flush()

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

    def goaway(self) -> None:
        """Tell the client no new calls are taken here (shutdown)."""
        if self.h2 is not None and not self.closed:
            try:
                self.h2.close_connection()
            except h2.exceptions.ProtocolError:
                pass
            self._flush()

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests.
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _flush(self) -> None:
        assert self.h2 is not None
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    # -- inbound ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        conn = self.h2
        if conn is None or self.closed:
            return
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            _logger.info("HTTP/2 protocol error; closing connection",
                         extra={"error": type(exc).__name__, "peer": self.name})
            self._flush()  # h2 queued a GOAWAY
            self.close()
            return
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                self._on_data(cast(h2.events.DataReceived, event))
            elif kind is h2.events.RequestReceived:
                self._on_request(cast(h2.events.RequestReceived, event))
            elif kind is h2.events.StreamEnded:
                self._on_end(cast(h2.events.StreamEnded, event).stream_id)
            elif kind is h2.events.StreamReset:
                stream = self.streams.pop(cast(h2.events.StreamReset, event).stream_id, None)
                if stream is not None:
                    self._abandon(stream)
            elif kind is h2.events.WindowUpdated:
                self._on_window(cast(h2.events.WindowUpdated, event).stream_id)
            elif kind is h2.events.ConnectionTerminated:
                self._flush()
                self.close()
                return
        self._flush()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        stream = _Stream(self, sid)
        stream.remote_closed = event.stream_ended is not None
        self.streams[sid] = stream
        method = path = ctype = b""
        metadata: list[tuple[str, str | bytes]] = []
        for key, value in event.headers:
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

    def _on_data(self, event: h2.events.DataReceived) -> None:
        assert self.h2 is not None
        sid = event.stream_id
        self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
        stream = self.streams.get(sid)
        if stream is None or stream.finished or stream.handler is None:
            return
        stream.buf += event.data
        if len(stream.buf) > self.server.max_message + 5:
            self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"request message larger than {self.server.max_message} bytes")

    def _on_end(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.remote_closed = True
        if stream.finished or stream.handler is None:
            if stream.finished:
                self.streams.pop(sid, None)
            return
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
        ctx = ServicerContext(self.name, stream.metadata, stream, stream.deadline)
        if handler.unary_unary is not None:
            coro = self._unary(stream, handler, request, ctx)
        elif handler.unary_stream is not None:
            coro = self._server_stream(stream, handler, request, ctx)
        else:
            self._fail(stream, grpc.StatusCode.UNIMPLEMENTED, "client streaming is not served")
            return
        task = asyncio.get_running_loop().create_task(coro)
        stream.task = task

    def _on_window(self, sid: int) -> None:
        targets = self.streams.values() if sid == 0 else (
            [self.streams[sid]] if sid in self.streams else [])
        for stream in targets:
            if stream.window is not None:
                stream.window.set()

    # -- calls -----------------------------------------------------------

    async def _unary(self, stream: _Stream, handler: Handler, request: Any,
                     ctx: ServicerContext) -> None:
        try:
            if stream.deadline is None:
                response = await handler.unary_unary(request, ctx)
            else:
                async with asyncio.timeout_at(stream.deadline):
                    response = await handler.unary_unary(request, ctx)
            payload = handler.response_serializer(response)
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

    async def _server_stream(self, stream: _Stream, handler: Handler, request: Any,
                             ctx: ServicerContext) -> None:
        try:
            async with asyncio.timeout_at(stream.deadline):
                result = handler.unary_stream(request, ctx)
                if isinstance(result, AsyncIterator):
                    async for message in result:
                        await self.send_message(stream, message)
                else:
                    await result
        except grpc.aio.AbortError:
            self._end_error(stream, ctx)
            return
        except TimeoutError:
            ctx.code, ctx.details = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
            self._end_error(stream, ctx)
            return
        except asyncio.CancelledError:
            if stream.reset or self.closed:
                return
            raise
        except Exception:
            _logger.exception("unhandled error", extra={"method": stream.path})
            ctx.code, ctx.details = grpc.StatusCode.INTERNAL, "internal error"
            self._end_error(stream, ctx)
            return
        if ctx.code is not None and ctx.code != grpc.StatusCode.OK:
            self._end_error(stream, ctx)
            return
        await self._send(stream, None, end=True, trailing=ctx.trailing_metadata())

    async def send_message(self, stream: _Stream, message: Any) -> None:
        if stream.reset or stream.finished or self.closed:
            raise asyncio.CancelledError()
        await self._send(stream, stream.handler.response_serializer(message), end=False)

    async def _send(self, stream: _Stream, payload: bytes | None, *, end: bool,
                    trailing: Sequence[tuple[str, str | bytes]] = ()) -> None:
        conn = self.h2
        if conn is None or stream.reset or stream.finished or self.closed:
            return
        sid = stream.id
        if not stream.headers_sent:
            conn.send_headers(sid, _RESPONSE_HEADERS)
            stream.headers_sent = True
        if payload is not None:
            data = len(payload).to_bytes(5, "big") + payload  # flag byte 0: uncompressed
            while data:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    self._flush()
                    if stream.window is None:
                        stream.window = asyncio.Event()
                    stream.window.clear()
                    await stream.window.wait()
                    if stream.reset or self.closed:
                        return
                    continue
                conn.send_data(sid, data[:window])
                data = data[window:]
        if end:
            stream.finished = True
            trailers = _OK_TRAILERS + _metadata_headers(trailing) if trailing else _OK_TRAILERS
            conn.send_headers(sid, trailers, end_stream=True)
            self._close_stream(stream)
        self._flush()

    def _end_error(self, stream: _Stream, ctx: ServicerContext) -> None:
        code = ctx.code or grpc.StatusCode.UNKNOWN
        self._finish_error(stream, code, ctx.details, ctx.trailing_metadata())

    def _fail(self, stream: _Stream, code: grpc.StatusCode, details: str) -> None:
        self._finish_error(stream, code, details, ())

    def _finish_error(self, stream: _Stream, code: grpc.StatusCode, details: str,
                      trailing: Sequence[tuple[str, str | bytes]]) -> None:
        conn = self.h2
        if conn is None or stream.reset or stream.finished or self.closed:
            return
        stream.finished = True
        status = ((b"grpc-status", str(code.value[0]).encode()),
                  (b"grpc-message", urllib.parse.quote(details, safe=_MESSAGE_SAFE).encode()))
        block = status + _metadata_headers(trailing)
        if not stream.headers_sent:
            block = _RESPONSE_HEADERS + block  # trailers-only answer
        conn.send_headers(stream.id, block, end_stream=True)
        self._close_stream(stream)
        self._flush()

    def _http_error(self, stream: _Stream, status: bytes) -> None:
        assert self.h2 is not None
        stream.finished = True
        self.h2.send_headers(stream.id, ((b":status", status),), end_stream=True)
        self._close_stream(stream)

    def _close_stream(self, stream: _Stream) -> None:
        """Our side is done; if the client is still sending, stop it politely."""
        if stream.remote_closed:
            self.streams.pop(stream.id, None)
            return
        assert self.h2 is not None
        try:
            self.h2.reset_stream(stream.id, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.StreamClosedError:
            pass
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


class GrpcFront:
    """Owns the public sockets and the connections on them."""

    def __init__(self, *, registry: PeerRegistry, methods: Mapping[str, Handler],
                 max_per_uid: int, max_message: int) -> None:
        self.registry = registry
        self.methods = dict(methods)
        self.max_per_uid = max_per_uid
        self.max_message = max_message
        self.connections: set[_Connection] = set()
        self.h2_config = h2.config.H2Configuration(
            client_side=False, header_encoding=None,
            validate_inbound_headers=False, normalize_inbound_headers=False,
            validate_outbound_headers=False, normalize_outbound_headers=False)
        self._servers: list[tuple[asyncio.Server, Path]] = []
        self._nonce = secrets.token_hex(4)
        self._counter = itertools.count()

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
            conn.goaway()

    async def drain(self, grace: float) -> None:
        """Let calls in flight finish, for at most ``grace`` seconds."""
        tasks = [s.task for c in self.connections for s in c.streams.values()
                 if s.task is not None and not s.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)

    def close_links(self) -> None:
        for conn in list(self.connections):
            conn.close()
