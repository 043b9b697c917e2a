"""seal() splices the hash into one encoding: it must equal two full encodes.

Logs written before the splice must keep verifying, so the reference here is
the plain definition: canonical bytes without ``hash``, then with it.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import pytest

from badged.audit.record import canonical, check_event, checked_event, seal

_KEYS = ["a", "agent", "caller", "event", "exp", "h", "has", "hash_x", "hasi", "hasg",
         "kind", "prev", "seq", "time", "zeta", "\u00e9t\u00e9", "\u65e5\u672c", "clock_backwards_s",
         "Z", "_x", "hash\u00e9", "ha"]
_STRINGS = ["", "plain", "caf\u00e9", "\u65e5\u672c\u8a9e", "emoji \U0001f600", 'quote " and \\',
            "ctl \n\t\x00", '"hash":"x"', "}{,", "del \x7f", "ascii /<>&'~`|^", "1e-05 0.5 true"]


def _value(rng: random.Random, depth: int) -> Any:
    pick = rng.randrange(9 if depth < 3 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([rng.randrange(-(2**70), 2**70), rng.randrange(-(2**63), 2**64), 0])
    if pick == 3:
        return rng.choice([0.0, -1.5, 1e-7, 123456.789, 2.5e300])
    if pick in (4, 5):
        return rng.choice(_STRINGS)
    if pick in (6, 7):
        return {rng.choice([*_KEYS, "hash", "seq"]): _value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _plain(obj: Any) -> bytes:
    # The definition, independent of record.py's encoder plumbing.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _reference(record: dict[str, Any]) -> tuple[str, bytes]:
    digest = hashlib.sha256(_plain(record)).hexdigest()
    return digest, _plain({**record, "hash": digest}) + b"\n"


def _has_float(obj: Any) -> bool:
    if isinstance(obj, float):
        return True
    if isinstance(obj, dict):
        return any(_has_float(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_has_float(v) for v in obj)
    return False


@pytest.mark.parametrize("seed", range(40))
def test_seal_matches_two_full_encodes(seed: int) -> None:
    rng = random.Random(seed)
    fast = 0
    for _ in range(50):
        record = {rng.choice(_KEYS): _value(rng, 0) for _ in range(rng.randrange(8))}
        expected = _reference(dict(record))
        sealed = dict(record)
        assert seal(sealed) == expected
        assert sealed["hash"] == expected[0]
        assert canonical(record) == _plain(record)
        if not _has_float(record):
            # The orjson path (taken when the caller knows there is no float)
            # must give the same bytes, or decline and fall back.
            assert seal(dict(record), float_free=True) == expected
            fast += 1
    assert fast > 5


@pytest.mark.parametrize("seed", range(20))
def test_checked_event_says_float_free_exactly_when_no_float_anywhere(seed: int) -> None:
    rng = random.Random(1000 + seed)
    seen = set()
    for _ in range(100):
        event = {"event": "x.y", **{rng.choice(_KEYS[:11]): _value(rng, 0)
                                    for _ in range(rng.randrange(6))}}
        for reserved in ("seq", "time", "prev", "kind", "hash", "clock_backwards_s"):
            event.pop(reserved, None)
        try:
            fields, float_free = checked_event(event)
        except (TypeError, ValueError):
            continue  # a nested reserved-looking or secret name: refused either way
        assert float_free == (not _has_float(event))
        assert fields == event
        seen.add(float_free)
    assert seen == {True, False}


@pytest.mark.parametrize("record", [
    {},
    {"a": 1},  # only fields before "hash"
    {"z": 1},  # only fields after "hash"
    {"hash": "0" * 64, "a": 1, "z": 2},  # re-seal: the old hash is hashed over
    {"event": "token.issued", "caller": {"hash": 1, "exe": "/usr/bin/caf\u00e9"}, "seq": 1,
     "time": "2026-11-24T09:34:13.123456Z", "prev": "0" * 64, "kind": "event"},
])
def test_seal_edge_shapes(record: dict[str, Any]) -> None:
    expected = _reference(dict(record))
    assert seal(dict(record)) == expected


def test_check_event_name_cache_does_not_hide_secrets() -> None:
    # A name is remembered as safe only after it passed; secrets still fail
    # at any depth and in any case, before and after the cache is warm.
    for _ in range(2):
        assert check_event({"event": "e", "agent": "a"})["agent"] == "a"
        with pytest.raises(ValueError, match="must not contain"):
            check_event({"event": "e", "nested": {"Token": "x"}})
        with pytest.raises(TypeError):
            check_event({"event": "e", "nested": {1: "x"}})


@pytest.mark.parametrize("ts", [0.0, 1.5, 1764000000.123456, 1764000000.000001, 1764000000.0,
                                -1.25, 4102444800.5])
def test_format_time_fixed_width(ts: float) -> None:
    from datetime import UTC, timedelta, timezone

    from badged.audit.record import format_time, from_timestamp

    dt = from_timestamp(ts)
    expected = dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert format_time(dt) == expected
    assert format_time(dt.astimezone(timezone(timedelta(hours=5, minutes=30)))) == expected


def test_canonical_rejects_what_json_dumps_rejects() -> None:
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})
    with pytest.raises(TypeError):
        canonical({"x": object()})
