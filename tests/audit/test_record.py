"""The record format: canonical bytes, secret guard, reserved names."""

from __future__ import annotations

import hashlib
import json

import pytest

from badged.audit.record import (
    GENESIS,
    RecordError,
    canonical,
    check_event,
    parse_line,
    seal,
)


def test_canonical_is_sorted_compact_ascii() -> None:
    assert canonical({"b": 1, "a": "é", "c": [1, {"z": 0, "y": None}]}) == (
        b'{"a":"\\u00e9","b":1,"c":[1,{"y":null,"z":0}]}'
    )


def test_canonical_rejects_nan() -> None:
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})


@pytest.mark.parametrize("name", ["token", "pin", "credential", "private_key", "Token", "PIN"])
def test_secret_field_names_rejected_at_top_level(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        check_event({"event": "token.issued", name: "s3cret"})


def test_secret_field_names_rejected_when_nested() -> None:
    with pytest.raises(ValueError, match="private_key"):
        check_event({"event": "x", "request": {"keys": [{"private_key": "k"}]}})


def test_hash_of_secret_is_allowed() -> None:
    fields = check_event({"event": "token.issued", "credential_sha256": "ab" * 32})
    assert fields["credential_sha256"] == "ab" * 32


@pytest.mark.parametrize("name", ["seq", "time", "prev", "hash", "kind", "clock_backwards_s"])
def test_reserved_fields_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        check_event({"event": "x", name: 1})


def test_event_name_required() -> None:
    with pytest.raises(ValueError, match="event"):
        check_event({"agent": "a"})


def test_non_string_keys_rejected() -> None:
    with pytest.raises(TypeError):
        check_event({"event": "x", "m": {1: "a"}})


def _record(**extra: object) -> dict[str, object]:
    rec: dict[str, object] = {"seq": 1, "time": "2026-11-24T09:00:00.000000Z", "prev": GENESIS,
                              "kind": "event", "event": "x"}
    rec.update(extra)
    return rec


def test_seal_hash_is_sha256_of_canonical_without_hash() -> None:
    rec = _record(agent="a")
    digest, line = seal(rec)
    body = {k: v for k, v in json.loads(line).items() if k != "hash"}
    assert digest == hashlib.sha256(canonical(body)).hexdigest()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_line(line)["hash"] == digest


def test_parse_line_detects_edit_and_reencoding() -> None:
    _digest, line = seal(_record(agent="a"))
    with pytest.raises(RecordError) as exc:
        parse_line(line.replace(b'"agent":"a"', b'"agent":"b"'))
    assert exc.value.code == "hash_mismatch"
    pretty = json.dumps(json.loads(line), indent=1).encode()
    with pytest.raises(RecordError) as exc:
        parse_line(pretty)
    assert exc.value.code == "not_canonical"
    with pytest.raises(RecordError) as exc:
        parse_line(b'{"seq":1')
    assert exc.value.code == "malformed"


@pytest.mark.parametrize("fields", [
    {},
    {"agent": "a", "caller": {"hash": "x", "kind": 1}, "zeta": [1, {"a": None}]},
    {"aaa": "hash", "hash_like": 1, "ha": 2, "hasi": 3},
    {"z": "\u2603", "y": 1.5, "event": "e,\"hash\":x}"},
])
def test_seal_line_equals_full_canonical_encoding(fields: dict[str, object]) -> None:
    rec = _record(**fields)
    digest, line = seal(rec)
    assert line == canonical(rec) + b"\n"
    assert rec["hash"] == digest and parse_line(line) == rec


def test_seal_without_keys_after_hash() -> None:
    digest, line = seal({"a": 1})
    assert line == canonical({"a": 1, "hash": digest}) + b"\n"
    digest, line = seal({})
    assert line == canonical({"hash": digest}) + b"\n"
