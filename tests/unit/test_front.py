"""The socket front on real sockets: gRPC over HTTP/2 against grpcio clients and raw frames.

The front is badged's own gRPC server (h2 for framing), so these tests hold
it to what grpcio's server did: statuses, trailers, deadlines, cancellation,
flow control, size limits, and per-connection identity and cleanup.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from badged.listener.front import SOLO_QUIET_S, GrpcFront, MethodTable
from badged.listener.peers import PeerRegistry
from badged.service.auth import caller_of
from badged.service.errors import ErrorBoundary
from tests.conftest import short_tmpdir

Scenario = Callable[[GrpcFront, Path, dict[str, Any]], Awaitable[None]]


def _str_headers(decoded: object) -> dict[str, str]:
    """hpack's decode() yields str or bytes pairs depending on raw=; tests compare text."""
    assert isinstance(decoded, list)
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in decoded}


def _identity(b: bytes) -> bytes:
    return b


def _table(state: dict[str, Any]) -> MethodTable:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        state["peers"].append(context.peer())
        state.setdefault("callers", []).append(caller_of(context))
        state.setdefault("contexts", []).append(context)
        if request == b"hello":
            state["metadata"] = dict(context.invocation_metadata() or ())
        if request == b"abort":
            context.set_trailing_metadata((("x-why", "asked"),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail: 100%")
        if request == b"boom":
            raise RuntimeError("secret detail")
        if request.startswith(b"big:"):
            return b"z" * int(request[4:])
        return request

    async def slow(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        state["slow_started"].set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state["slow_cancelled"] = True
            raise
        return request

    async def count(request: bytes, context: grpc.aio.ServicerContext[Any, Any],
                    ) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()
        if request == b"2":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "stream ended badly")

    table = MethodTable()
    table.add_registered_method_handlers("t.T", {
        "Echo": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=_identity, response_serializer=_identity),
        "Slow": grpc.unary_unary_rpc_method_handler(
            slow, request_deserializer=_identity, response_serializer=_identity),
        "Count": grpc.unary_stream_rpc_method_handler(
            count, request_deserializer=_identity, response_serializer=_identity),
    })
    return table


def _run(scenario: Scenario, *, max_per_uid: int = 8) -> dict[str, Any]:
    base = short_tmpdir("bfr")
    state: dict[str, Any] = {"peers": []}

    async def main() -> None:
        state["slow_started"] = asyncio.Event()
        methods = await _table(state).intercepted([ErrorBoundary(log_details=True)])
        registry = PeerRegistry()
        state["registry"] = registry
        front = GrpcFront(registry=registry, methods=methods, max_per_uid=max_per_uid,
                          max_message=1024)
        public = base / "agent.sock"
        await front.serve(public, channel="workload", mode=0o666)
        try:
            await scenario(front, public, state)
        finally:
            await front.stop_accepting()
            await front.drain(1)
            front.close_links()

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return state


def _unary(ch: grpc.aio.Channel, method: str) -> Any:
    return ch.unary_unary(f"/t.T/{method}", request_serializer=_identity,
                          response_deserializer=_identity)


async def _raw_connect(public: Path, *, rcvbuf: int | None = None) -> socket.socket:
    """A plain non-blocking client socket on the front, for hand-made frames."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, str(public))
    return s


def test_unary_call_carries_the_connection_identity_and_metadata() -> None:
    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        assert stat.S_IMODE(os.stat(public).st_mode) == 0o666
        async with grpc.aio.insecure_channel(f"unix:{public}") as ch:
            got = await _unary(ch, "Echo")(b"hello", metadata=(("x-a", "1"), ("x-b-bin", b"\0\1")))
            assert got == b"hello"
            assert await _unary(ch, "Echo")(b"") == b""
            assert state["registry"].connections_of(os.getuid()) == 1
        for _ in range(100):
            if len(state["registry"]) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(state["registry"]) == 0, "registry entry leaked after the client closed"

    state = _run(scenario)
    assert len(set(state["peers"])) == 1, "one connection, one identity"
    assert f"pid={os.getpid()}" in state["peers"][0]
    # The handler got the accept-time snapshot itself, not a name to look up:
    # the same object for both calls on the connection, naming this process.
    first, second = state["callers"][:2]
    assert first is not None and first is second
    assert (first.pid, first.uid, first.channel) == (os.getpid(), os.getuid(), "workload")
    # Once the connection closed (and its pidfd was released) a context
    # still held by a call yields no caller: resolve_caller answers
    # UNAUTHENTICATED rather than poll a recycled descriptor.
    assert all(caller_of(ctx) is None for ctx in state["contexts"])
    assert state["metadata"]["x-a"] == "1"
    assert state["metadata"]["x-b-bin"] == b"\0\1"


def test_errors_become_statuses_with_trailers_and_safe_messages() -> None:
    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        async with grpc.aio.insecure_channel(f"unix:{public}") as ch:
            call = _unary(ch, "Echo")(b"abort")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert info.value.details() == "asked to fail: 100%"  # percent-encoded on the wire
            assert ("x-why", "asked") in tuple(info.value.trailing_metadata() or ())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _unary(ch, "Echo")(b"boom")
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in (info.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _unary(ch, "Nope")(b"x")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _unary(ch, "Echo")(b"x" * 5000)  # over max_message=1024
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The connection is still good after all of that.
            assert await _unary(ch, "Echo")(b"again") == b"again"

    _run(scenario)


def test_deadline_and_cancellation_stop_the_handler() -> None:
    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        async with grpc.aio.insecure_channel(f"unix:{public}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _unary(ch, "Slow")(b"x", timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.1)
            assert state.pop("slow_cancelled", False), "handler kept running past its deadline"
            state["slow_started"].clear()
            call = _unary(ch, "Slow")(b"x")
            await asyncio.wait_for(state["slow_started"].wait(), 5)
            call.cancel()
            for _ in range(100):
                if state.get("slow_cancelled"):
                    break
                await asyncio.sleep(0.01)
            assert state.get("slow_cancelled"), "RST_STREAM did not cancel the handler"

    _run(scenario)


def test_large_response_respects_flow_control() -> None:
    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        # 600 KB is far above HTTP/2's default 64 KiB window: the front must
        # wait for WINDOW_UPDATEs instead of overrunning the client.
        async with grpc.aio.insecure_channel(f"unix:{public}") as ch:
            got = await _unary(ch, "Echo")(b"big:600000")
            assert got == b"z" * 600000

    _run(scenario)


def test_server_streaming_messages_then_status() -> None:
    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        async with grpc.aio.insecure_channel(f"unix:{public}") as ch:
            stream = ch.unary_stream("/t.T/Count", request_serializer=_identity,
                                     response_deserializer=_identity)
            assert [m async for m in stream(b"3")] == [b"0", b"1", b"2"]
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for m in stream(b"2"):
                    got.append(m)
            assert got == [b"0", b"1"]
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    _run(scenario)


def test_per_uid_connection_cap_evicts_the_oldest_idle_connection() -> None:
    """At the cap the oldest idle connection of the uid goes (GOAWAY with a reason), so one
    process hoarding connections cannot lock its siblings out; with none idle, the newcomer
    is refused with a reason instead of a bare reset."""
    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        socks, readers = [], []
        for _ in range(2):
            s = await _raw_connect(public)
            socks.append(s)
            readers.append(_Reader(s))
            assert (await readers[-1].until(4))[-1][0] == 4  # server SETTINGS
        third = await _raw_connect(public)
        frames = await _Reader(third).until(4)
        assert frames[-1][0] == 4, "third not admitted"
        evicted = await readers[0].until(-1)
        goaway = [f for f in evicted if f[0] == 7]
        assert goaway and goaway[0][3][4:8] == b"\0\0\0\0"
        assert b"evicted" in goaway[0][3][8:]
        assert state["registry"].connections_of(os.getuid()) == 2
        # Both remaining connections busy (a call in flight): the next one is refused.
        import hpack
        enc = hpack.Encoder()
        slow = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Slow"),
                           (":authority", "x"), ("content-type", "application/grpc")])
        for s in (socks[1], third):
            await loop.sock_sendall(s, PREFACE + _frame(4, 0, 0, b"") + _frame(1, 0x4, 1, slow)
                                    + _frame(0, 0x1, 1, b"\0\0\0\0\1x"))
        await asyncio.wait_for(state["slow_started"].wait(), 5)
        await asyncio.sleep(0.05)
        fourth = await _raw_connect(public)
        frames = await _Reader(fourth).until(-1)
        goaway = [f for f in frames if f[0] == 7]
        assert goaway and b"per-uid connection limit" in goaway[0][3][8:], frames
        for s in (*socks, third, fourth):
            s.close()

    _run(scenario, max_per_uid=2)


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", ftype, flags, stream) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Reader:
    """Raw frames from a socket, keeping what arrived past the last one returned."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    async def until(self, until_type: int) -> list[tuple[int, int, int, bytes]]:
        """Frames until one of ``until_type`` arrives, or EOF."""
        loop = asyncio.get_running_loop()
        frames = []
        while True:
            buf = self.buf
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n = int.from_bytes(buf[:3], "big")
                frame = (buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF,
                         buf[9:9 + n])
                buf = self.buf = buf[9 + n:]
                frames.append(frame)
                if frame[0] == until_type:
                    return frames
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 5)
            if not chunk:
                frames.append((-1, 0, 0, b""))  # EOF
                return frames
            self.buf += chunk


def test_protocol_garbage_closes_only_that_connection() -> None:
    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        bad = await _raw_connect(public)
        await loop.sock_sendall(bad, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
        frames = await _Reader(bad).until(-1)
        assert frames[-1][0] == -1, "connection not closed"
        bad.close()
        # Even-numbered (server-initiated) stream id from a client: connection error.
        evil = await _raw_connect(public)
        await loop.sock_sendall(evil, PREFACE + _frame(4, 0, 0, b"")
                                + _frame(1, 0x5, 2, b"\x83\x86"))
        frames = await _Reader(evil).until(-1)
        assert [f[0] for f in frames][-2:] == [7, -1], "expected GOAWAY, then close"
        evil.close()
        async with grpc.aio.insecure_channel(f"unix:{public}") as ch:
            assert await _unary(ch, "Echo")(b"fine") == b"fine"
        for _ in range(100):
            if len(state["registry"]) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(state["registry"]) == 0

    _run(scenario)


def test_non_grpc_requests_are_refused_per_stream() -> None:
    import hpack

    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        s = await _raw_connect(public)
        enc = hpack.Encoder()
        get = enc.encode([(":method", "GET"), (":scheme", "http"), (":path", "/t.T/Echo"),
                          (":authority", "x")])
        json_post = enc.encode([(":method", "POST"), (":scheme", "http"),
                                (":path", "/t.T/Echo"), (":authority", "x"),
                                ("content-type", "application/json")])
        await loop.sock_sendall(s, PREFACE + _frame(4, 0, 0, b"")
                                + _frame(1, 0x5, 1, get) + _frame(1, 0x5, 3, json_post))
        dec = hpack.Decoder()
        reader = _Reader(s)
        statuses: dict[int, str] = {}
        while len(statuses) < 2:
            for ftype, _flags, sid, payload in await reader.until(1):
                if ftype == 1:
                    statuses[sid] = _str_headers(dec.decode(payload))[":status"]
        assert statuses == {1: "405", 3: "415"}
        # Compressed-flag message without a grpc-encoding: INTERNAL (gRPC spec), not a crash.
        post = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Echo"),
                           (":authority", "x"), ("content-type", "application/grpc")])
        await loop.sock_sendall(s, _frame(1, 0x4, 5, post)
                                + _frame(0, 0x1, 5, b"\x01\x00\x00\x00\x01x"))
        headers: dict[str, str] = {}
        while not headers:
            for ftype, _flags, sid, payload in await reader.until(1):
                if ftype == 1 and sid == 5:
                    headers = _str_headers(dec.decode(payload))
        assert headers["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
        s.close()

    _run(scenario)


def test_client_that_stops_reading_is_paused_not_buffered() -> None:
    import hpack

    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        s = await _raw_connect(public, rcvbuf=4096)
        enc = hpack.Encoder()
        block = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Echo"),
                            (":authority", "x"), ("content-type", "application/grpc")])
        # A huge receive window, so only the socket buffers hold answers back.
        settings = struct.pack(">HI", 0x4, 2**31 - 1)
        out = [PREFACE, _frame(4, 0, 0, settings), _frame(8, 0, 0, struct.pack(">I", 2**31 - 65536))]
        msg = b"big:60000"  # 90 answers of 60 KB: far more than the socket buffers hold
        for sid in range(1, 2 * 90, 2):
            out += [_frame(1, 0x4, sid, block),
                    _frame(0, 0x1, sid, b"\0" + struct.pack(">I", len(msg)) + msg)]
        await loop.sock_sendall(s, b"".join(out))
        for _ in range(200):
            if front.connections:
                break
            await asyncio.sleep(0.01)
        (conn,) = front.connections
        for _ in range(200):
            if conn._write_paused:
                break
            await asyncio.sleep(0.01)
        assert conn._write_paused, "answers kept piling up in the daemon's buffer"
        assert conn.transport is not None and not conn.transport.is_reading()
        # Once the client reads, the front resumes and answers everything.
        received = 0
        while received < 90 * 60000:
            received += len(await asyncio.wait_for(loop.sock_recv(s, 1 << 20), 5))
        assert not conn._write_paused and conn.transport.is_reading()
        s.close()

    _run(scenario)


def test_fuzzed_grpc_streams_never_break_the_front() -> None:
    """Mutated request streams against a live front: every connection ends in an
    answer or a GOAWAY/close, nothing escapes as an unhandled error, and a
    well-formed client is served afterwards."""
    import logging
    import random

    import hpack

    rng = random.Random(7)
    errors: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record)

    def stream(sid: int, enc: hpack.Encoder) -> bytes:
        path = rng.choice(["/t.T/Echo", "/t.T/Echo", "/t.T/Count", "/t.T/Nope", ""])
        headers = [(":method", rng.choice(["POST", "POST", "GET"])), (":scheme", "http"),
                   (":path", path), (":authority", "x"),
                   ("content-type", rng.choice(["application/grpc", "text/plain"]))]
        if rng.random() < 0.3:
            headers.append(("grpc-timeout", rng.choice(["1S", "5m", "x", "99999999H"])))
        msg = rng.choice([b"hi", b"3", b"abort", b"big:100", b"", b"x" * 2000])
        body = bytes([rng.choice([0, 0, 1])]) + len(msg).to_bytes(4, "big") + msg
        if rng.random() < 0.2:
            body = body[:rng.randint(0, len(body))]
        return (_frame(1, 0x4, sid, enc.encode(headers))
                + _frame(0, 0x1, sid, body))

    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(150):
            enc = hpack.Encoder()
            data = bytearray(PREFACE + _frame(4, 0, 0, b""))
            for i in range(rng.randint(1, 4)):
                data += stream(2 * i + 1, enc)
            if rng.random() < 0.5:  # half the connections get corrupted bytes
                for _ in range(rng.randint(1, 3)):
                    pos = rng.randrange(24, len(data))
                    data[pos] = rng.randrange(256)
            s = await _raw_connect(public)
            try:
                await loop.sock_sendall(s, bytes(data))
                # Read answers until the front closes or goes quiet.
                while await asyncio.wait_for(loop.sock_recv(s, 65536), 0.02):
                    pass
            except (ConnectionError, OSError, TimeoutError):
                pass
            finally:
                s.close()
        state["fuzz_calls"] = len(state["peers"])
        async with grpc.aio.insecure_channel(f"unix:{public}") as ch:
            assert await _unary(ch, "Echo")(b"still fine") == b"still fine"
        for _ in range(100):
            if not front.connections and front.active_calls == 0:
                break
            await asyncio.sleep(0.01)
        assert not front.connections and front.active_calls == 0

    handler = Catch()
    logging.getLogger("badged.listener.front").addHandler(handler)
    try:
        state = _run(scenario)
        assert state["fuzz_calls"] > 5, "too few fuzzed calls reached a handler"
    finally:
        logging.getLogger("badged.listener.front").removeHandler(handler)
    # The "boom" handler is the only legitimate source of logged errors here.
    assert not [r for r in errors if "unhandled error" not in r.getMessage()], \
        [r.getMessage() for r in errors]


def test_solo_only_after_a_quiet_spell_without_overlapping_calls() -> None:
    """The audit log's inline fsync path must not open in a lull between loaded calls."""
    now = [100.0]
    front = GrpcFront(registry=PeerRegistry(), methods={}, max_per_uid=8, max_message=1024,
                      clock=lambda: now[0])
    # A sequential caller: one call at a time, never beside another.
    for _ in range(3):
        front.call_started()
        assert front.solo()
        front.call_done(None)
    assert front.solo()
    # Two calls overlap: not solo, and not solo either once the second is
    # alone again, nor after both finished, until the quiet spell has passed.
    front.call_started()
    front.call_started()
    assert not front.solo()
    front.call_done(None)
    assert front.active_calls == 1 and not front.solo()
    front.call_done(None)
    now[0] += SOLO_QUIET_S / 2
    assert not front.solo()
    now[0] += SOLO_QUIET_S
    assert front.solo()
    front.call_started()
    assert front.solo()
