"""Differential fuzzing: the front's hand-written HTTP/2 + HPACK decoding against ``h2``.

The same client byte stream goes to ``http2.ServerConnection`` and to
python-hyper's ``h2`` state machine (server side, same settings and windows,
header validation off on both sides: the front checks gRPC semantics
itself). The streams are random but mostly well-formed: requests with
random headers HPACK-encoded with and without Huffman, indexing, and table
size updates, split over CONTINUATIONs; bodies split over DATA frames with
and without padding; SETTINGS, PING, PRIORITY, WINDOW_UPDATE, RST_STREAM
between them; and random byte flips, most of them inside header blocks,
the attack-prone part.

What must agree, frame by frame, until either side ends the connection:
every request's decoded header list, every stream's body bytes and end, and
resets. Where one side ends the connection and the other does not, the
difference must be one of the deliberate ones listed in ``_ALLOWED`` (the
front is stricter about resources, h2 about stream states the front lets
pass); a header block one side cannot decode the other must not decode
either. Bounded in time (a few seconds), seeded, reproducible.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest

from badged.listener import http2
from badged.listener.http2 import ProtocolViolation, ServerConnection, frame

DATA, HEADERS, PRIORITY, RST, SETTINGS, PING, WINDOW_UPDATE, CONTINUATION = 0, 1, 2, 3, 4, 6, 8, 9
TIME_BUDGET_S = 4.0


class Ours(ServerConnection):
    def __init__(self) -> None:
        super().__init__(stream_window=http2.STREAM_WINDOW, conn_window=http2.CONN_WINDOW)
        self.events: list[tuple[object, ...]] = []

    def on_request(self, sid: int, headers: Sequence[tuple[bytes, bytes]], end: bool) -> None:
        self.events.append(("request", sid, tuple(headers)))
        if end:
            self.events.append(("end", sid))

    def on_data(self, sid: int, data: bytes, end: bool) -> None:
        if data:
            self.events.append(("data", sid, data))
        if end:
            self.events.append(("end", sid))
        self.consumed(len(data))

    def on_reset(self, sid: int) -> None:
        self.events.append(("reset", sid))


def theirs() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, validate_inbound_headers=False, normalize_inbound_headers=False,
        validate_outbound_headers=False, header_encoding=None))
    conn.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: http2.MAX_STREAMS,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: http2.STREAM_WINDOW,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: http2.MAX_HEADER_LIST,
    })
    conn.initiate_connection()
    # Settings given as initial values are in force at once, but h2 hands the
    # header-list limit to its HPACK decoder only on an acknowledged change.
    conn.decoder.max_header_list_size = http2.MAX_HEADER_LIST
    conn.increment_flow_control_window(http2.CONN_WINDOW - 65535)
    conn.data_to_send()
    return conn


def their_events(conn: h2.connection.H2Connection, data: bytes) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for ev in conn.receive_data(data):
        if isinstance(ev, h2.events.RequestReceived):
            out.append(("request", ev.stream_id, tuple((bytes(k), bytes(v)) for k, v in ev.headers)))
        elif isinstance(ev, h2.events.TrailersReceived):
            pass  # the front takes trailers only as the end of the stream
        elif isinstance(ev, h2.events.DataReceived):
            if ev.data:
                out.append(("data", ev.stream_id, bytes(ev.data)))
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            out.append(("end", ev.stream_id))
        elif isinstance(ev, h2.events.StreamReset):
            out.append(("reset", ev.stream_id))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            raise h2.exceptions.ProtocolError("GOAWAY from the client")
    conn.data_to_send()
    return out


_NAMES = [b"x-a", b"x-custom-header", b"user-agent", b"grpc-timeout", b"te", b"authorization",
          b"x-bin-bin", b"cookie", b"accept-encoding", b"x-" + b"n" * 40]


def _value(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        return rng.choice([b"1S", b"trailers", b"gzip", b"grpc-python/1.0", b""])
    if kind < 0.8:
        return bytes(rng.randrange(0x20, 0x7F) for _ in range(rng.randint(0, 60)))
    return rng.randbytes(rng.randint(0, 30))


class Client:
    """A random, mostly well-formed HTTP/2 client."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.enc = hpack.Encoder()
        self.sid = 1
        self.open: list[int] = []

    def request(self) -> list[bytes]:
        rng = self.rng
        headers = [(b":method", b"POST"), (b":scheme", b"http"),
                   (b":path", rng.choice([b"/a.B/C", b"/" + rng.randbytes(5).hex().encode()])),
                   (b":authority", b"x"), (b"content-type", b"application/grpc")]
        for _ in range(rng.randint(0, 6)):
            headers.append((rng.choice(_NAMES), _value(rng)))
        if rng.random() < 0.05:
            self.enc.header_table_size = rng.choice([0, 256, 4096])
        if rng.random() < 0.03:  # a header list over the limit
            headers.append((b"x-big", b"v" * rng.randint(8000, 20000)))
        block = bytes(self.enc.encode(headers, huffman=rng.random() < 0.5))
        sid, self.sid = self.sid, self.sid + 2
        end = rng.random() < 0.2
        flags = http2.END_STREAM if end else 0
        pieces = [block]
        if len(block) > 16000 or rng.random() < 0.2:
            cut = sorted(rng.sample(range(len(block) + 1), k=min(2, len(block) + 1)))
            pieces = [block[:cut[0]], block[cut[0]:cut[-1]], block[cut[-1]:]]
        frames: list[bytes] = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            while len(piece) > 16384:
                frames.append(frame(HEADERS if not frames else CONTINUATION, 0 if frames or i else flags,
                                    sid, piece[:16384]))
                piece = piece[16384:]
            ftype = HEADERS if not frames else CONTINUATION
            fl = (http2.END_HEADERS if last else 0) | (flags if ftype == HEADERS else 0)
            if ftype == HEADERS and rng.random() < 0.1:
                pad = rng.randint(0, 20)
                frames.append(frame(HEADERS, fl | http2.PADDED, sid, bytes([pad]) + piece + b"\0" * pad))
            else:
                frames.append(frame(ftype, fl, sid, piece))
        if not end:
            self.open.append(sid)
        return frames

    def data(self) -> list[bytes]:
        rng = self.rng
        if not self.open:
            return []
        sid = rng.choice(self.open)
        body = rng.randbytes(rng.randint(0, 3000))
        end = rng.random() < 0.6
        if end:
            self.open.remove(sid)
        if rng.random() < 0.2:
            pad = rng.randint(0, 40)
            return [frame(DATA, http2.PADDED | (http2.END_STREAM if end else 0), sid,
                          bytes([pad]) + body + b"\0" * pad)]
        return [frame(DATA, http2.END_STREAM if end else 0, sid, body)]

    def other(self) -> list[bytes]:
        rng = self.rng
        pick = rng.random()
        if pick < 0.25:
            return [frame(PING, 0, 0, rng.randbytes(8))]
        if pick < 0.45:
            return [frame(SETTINGS, 0, 0, struct.pack(">HI", rng.choice([1, 3, 4, 6]),
                                                      rng.choice([0, 100, 4096, 65535, 1 << 20])))]
        if pick < 0.6:
            return [frame(WINDOW_UPDATE, 0, rng.choice([0, max(1, self.sid - 2)]),
                          struct.pack(">I", rng.randint(1, 100000)))]
        if pick < 0.75 and self.sid > 1:
            return [frame(PRIORITY, 0, rng.randrange(1, self.sid, 2),
                          struct.pack(">IB", 0, rng.randint(0, 255)))]
        if self.open:
            sid = rng.choice(self.open)
            self.open.remove(sid)
            return [frame(RST, 0, sid, struct.pack(">I", 8))]
        return []


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """Flip bytes: mostly in header-block payloads, sometimes anywhere."""
    out = list(frames)
    for _ in range(rng.randint(1, 3)):
        candidates = [i for i, f in enumerate(out) if f[3] in (HEADERS, CONTINUATION) and len(f) > 9]
        i = rng.choice(candidates) if candidates and rng.random() < 0.8 else rng.randrange(len(out))
        f = bytearray(out[i])
        if len(f) <= 9:
            continue
        pos = rng.randrange(9, len(f)) if rng.random() < 0.9 else rng.randrange(len(f))
        f[pos] = rng.randrange(256)
        out[i] = bytes(f)
    return out


# Where the two may part ways on purpose: (which side ended the connection, why).
_ALLOWED_OURS = {
    http2.ENHANCE_YOUR_CALM,  # our cheap-frame bucket and header-block size bound
}


def _verdict(ours: Ours, them: h2.connection.H2Connection, our_error: ProtocolViolation | None,
             their_error: Exception | None) -> str:
    if our_error is None and their_error is None:
        return "both accept"
    if our_error is not None and their_error is not None:
        return "both refuse"
    if our_error is not None:
        if our_error.code in _ALLOWED_OURS:
            return "ours stricter (resources)"
        if our_error.code == http2.COMPRESSION_ERROR:
            raise AssertionError(f"we failed HPACK where h2 decoded: {our_error}")
        return f"ours refuse: {our_error}"
    assert their_error is not None
    if _hpack_failure(their_error):
        raise AssertionError(f"h2 failed HPACK where we decoded: {their_error}")
    return f"h2 refuses: {type(their_error).__name__}"


def test_front_and_h2_agree_on_every_decoded_request_and_body() -> None:
    rng = random.Random(16_2026)
    deadline = time.monotonic() + TIME_BUDGET_S
    verdicts: dict[str, int] = {}
    cases = 0
    while time.monotonic() < deadline:
        seed = rng.randrange(1 << 30)
        case = random.Random(seed)
        try:
            verdict = _compare(case)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from None
        key = verdict.split(":")[0]
        verdicts[key] = verdicts.get(key, 0) + 1
        cases += 1
    assert cases > 200, cases
    assert verdicts.get("both accept", 0) > cases // 10, verdicts
    assert verdicts.get("both refuse", 0) > 0, verdicts


def _compare(rng: random.Random) -> str:
    """Feed frame by frame; the event logs must match up to the first refusal."""
    client = Client(rng)
    frames = [http2.PREFACE + frame(SETTINGS, 0, 0, b"") + frame(SETTINGS, http2.ACK, 0, b"")]
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        frames += client.request() if kind < 0.45 else client.data() if kind < 0.8 else client.other()
    if len(frames) > 1 and rng.random() < 0.5:
        frames = frames[:1] + _mutate(rng, frames[1:])
    ours, them = Ours(), theirs()
    their_log: list[tuple[object, ...]] = []
    our_error: ProtocolViolation | None = None
    their_error: Exception | None = None
    for chunk in frames:
        try:
            ours.receive(chunk)
        except ProtocolViolation as exc:
            our_error = exc
        try:
            their_log += their_events(them, chunk)
        except (h2.exceptions.ProtocolError, h2.exceptions.FrameTooLargeError,
                h2.exceptions.FrameDataMissingError) as exc:
            their_error = exc
        if our_error is not None or their_error is not None:
            break
        assert _normal(ours.events) == _normal(their_log), (ours.events, their_log)
    return _verdict(ours, them, our_error, their_error)


def _hpack_failure(exc: Exception) -> bool:
    """h2 reports HPACK failures as ProtocolError("Error decoding header block: ...")."""
    return isinstance(exc, h2.exceptions.ProtocolError) and "decoding header block" in str(exc)


def _normal(events: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """Bodies per stream as one byte string (frame boundaries are not semantics)."""
    out: list[tuple[object, ...]] = []
    for ev in events:
        if ev[0] == "data" and out and out[-1][0] == "data" and out[-1][1] == ev[1]:
            out[-1] = ("data", ev[1], out[-1][2] + ev[2])  # type: ignore[operator]
        else:
            out.append(ev)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_hpack_decoding_agrees_block_by_block(seed: int) -> None:
    """Header blocks alone, heavily mutated: decoded by both or refused by both."""
    rng = random.Random(seed)
    for _ in range(300):
        enc = hpack.Encoder()
        blocks = [bytes(enc.encode([(rng.choice(_NAMES), _value(rng)) for _ in range(rng.randint(1, 5))],
                                   huffman=rng.random() < 0.5)) for _ in range(3)]
        i = rng.randrange(3)
        b = bytearray(blocks[i])
        for _ in range(rng.randint(1, 4)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        blocks[i] = bytes(b)
        ours, them = Ours(), theirs()
        data = http2.PREFACE + frame(SETTINGS, 0, 0, b"")
        ours.receive(data)
        their_events(them, data)
        for n, block in enumerate(blocks):
            chunk = frame(HEADERS, http2.END_HEADERS | http2.END_STREAM, 2 * n + 1, block)
            try:
                ours.receive(chunk)
                our_ok = True
            except ProtocolViolation:
                our_ok = False
            try:
                their_events(them, chunk)
                their_ok = True
            except h2.exceptions.ProtocolError as exc:
                if not _hpack_failure(exc):
                    break  # h2 refuses the *meaning* (e.g. a bad content-length), not the bytes
                their_ok = False
            assert our_ok == their_ok, (seed, n, block.hex())
            if not our_ok:
                break
