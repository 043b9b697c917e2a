"""The load generator's HPACK encoding: what grpcio sends, decodable by a real decoder."""

from __future__ import annotations

import sys
from pathlib import Path

import hpack

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from badgebench.h2grpc import HpackIndexer, request_headers


def test_blocks_index_like_grpcio_and_decode_to_the_same_headers() -> None:
    enc, dec = HpackIndexer(), hpack.Decoder()
    sizes = []
    for path in ["/s/Sign", "/s/Sign", "/s/FetchToken", "/s/Sign", "/s/FetchToken"] * 3:
        block = enc.encode(request_headers(path))
        got = [(bytes(k), bytes(v)) for k, v in dec.decode(block, raw=True)]
        assert got == request_headers(path)
        sizes.append(len(block))
    # First sight of a header: a literal with indexing; afterwards one byte each,
    # as grpcio's client sends them (c3c28386c1c0bfbe for its eight headers).
    assert sizes[0] > 40 and sizes[2] > 6
    assert sizes[1] == 6 and all(n == 6 for n in sizes[3:])
    fresh = HpackIndexer()
    fresh.encode(request_headers("/s/Sign"))
    # :method POST, :scheme http (static), then dynamic entries 65, 64, 63, 62.
    assert fresh.encode(request_headers("/s/Sign")) == bytes.fromhex("8386c1c0bfbe")
