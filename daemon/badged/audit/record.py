"""The audit record format: canonical bytes, hashing, validation. No I/O.

Writer (:mod:`badged.audit.log`), verifier (:mod:`badged.audit.verify`) and
readers all go through this module, so "what a valid record is" is defined in
exactly one place. A record is one line of canonical JSON::

    {"agent":"deploy-bot","event":"token.issued","hash":"<64 hex>","kind":"event",
     "prev":"<64 hex>","seq":42,"time":"2026-11-24T09:34:13.123456Z",...}

* ``hash`` is SHA-256 over the canonical JSON of the record *without* ``hash``;
* ``prev`` is the ``hash`` of the record with ``seq - 1`` (``GENESIS`` for seq 1);
* canonical = sorted keys, no whitespace, ASCII only, no NaN/Infinity, so any
  verifier in any language re-derives the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from badged.core.jsonenc import float_free_ascii_json, sorted_compact_encoder

GENESIS: Final = "0" * 64
"""``prev`` of the very first record (seq 1)."""

KIND_EVENT: Final = "event"
KIND_CHECKPOINT: Final = "checkpoint"
KIND_RECOVERY: Final = "recovery"
KINDS: Final = frozenset({KIND_EVENT, KIND_CHECKPOINT, KIND_RECOVERY})

CLOCK_BACKWARDS: Final = "clock_backwards_s"
"""Set on a record whose wall-clock time is earlier than its predecessor's."""

RESERVED_FIELDS: Final = frozenset({"seq", "time", "prev", "hash", "kind", CLOCK_BACKWARDS})
"""Fields the log owns; an event that tries to set one is rejected."""

FORBIDDEN_FIELDS: Final = frozenset({"token", "pin", "credential", "private_key"})
"""Names that would mean a secret is about to be written to disk (any depth)."""

CHECKPOINT_DOMAIN: Final = b"badged-audit-checkpoint-v1\n"
"""Prefix of every signed checkpoint statement, so a device-key signature made
for some other purpose can never be passed off as a checkpoint (and vice versa)."""

CHECKPOINT_SIGNED_FIELDS: Final = ("head", "head_seq", "key", "reason", "sealed_at")

CHECKPOINT_SPAN_FIELDS: Final = ("span_from", "span_sha256")
"""Optional, signed when present: SHA-256 of the exact bytes of the lines with
seq ``span_from`` .. ``head_seq`` (each with its newline), as the writer
chained them. Lets ``verify`` prove a stretch with one hash over its bytes
(docs/audit.md, "Span hashes"); a checkpoint without them is the old format,
whose statement is unchanged."""


class RecordError(ValueError):
    """A line is not a valid record. ``code`` is stable, ``message`` for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Canonical form: sorted keys, no spaces, ASCII only, no NaN/Infinity.
_encode: Final = sorted_compact_encoder(ensure_ascii=True, allow_nan=False)


def canonical(obj: Mapping[str, Any]) -> bytes:
    """Deterministic JSON bytes: the only serialization hashes are taken over."""
    return _encode(obj).encode("ascii")


def format_time(dt: datetime) -> str:
    """RFC 3339 UTC with microseconds and ``Z``: fixed width, sorts as text."""
    # isoformat() is C and ~3x faster than strftime; timespec pins 6 digits.
    if dt.tzinfo is UTC and dt.microsecond:
        # The hot path (from_timestamp): already UTC, and with a non-zero
        # microsecond the default timespec prints exactly 6 digits too.
        return dt.isoformat()[:-6] + "Z"
    return dt.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def from_timestamp(ts: float) -> datetime:
    """Clock seconds to an aware UTC datetime (microsecond resolution)."""
    return datetime.fromtimestamp(ts, UTC)


def parse_time(text: str) -> datetime:
    """Inverse of :func:`format_time` (accepts any RFC 3339 offset)."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError(f"time without offset: {text!r}")
    return dt.astimezone(UTC)


_PLAIN_TYPES: Final = frozenset((str, int, bool, type(None)))


_SAFE_KEYS: set[str] = set()
"""Field names already seen to be exact ``str`` and not secret-looking (bounded).

``key.lower() in FORBIDDEN_FIELDS`` is a pure function of the text, and the
daemon uses a few dozen fixed names, so the answer is remembered instead of
lower-casing every name of every record again."""
_SAFE_KEYS_MAX: Final = 4096


def _walk(value: Any, path: str) -> bool:
    """Reject forbidden names at any depth and keys JSON would silently coerce.

    Runs on the event loop for every append, so the common case (a scalar of
    an exact builtin type, a field name seen before) is a set lookup, not an
    isinstance() chain; a plain dict skips the ``Mapping`` ABC check. Returns
    whether the value is float-free (only str, int, bool, None and
    containers of them): only such records may take :func:`seal`'s fast
    encoder.
    """
    float_free = True
    if type(value) is dict or isinstance(value, Mapping):
        for key, sub in value.items():
            if type(key) is not str:
                raise TypeError(f"audit field names must be str, got {key!r} at {path or '.'}")
            if key not in _SAFE_KEYS:
                if key.lower() in FORBIDDEN_FIELDS:
                    # A guard against future mistakes: the log must never hold a
                    # secret, whatever a caller passes. Hashes go in *_sha256 fields.
                    raise ValueError(f"audit event must not contain field {path}{key!r}")
                if len(_SAFE_KEYS) < _SAFE_KEYS_MAX:
                    _SAFE_KEYS.add(key)
            if type(sub) not in _PLAIN_TYPES:
                float_free = _walk(sub, f"{path}{key}.") and float_free
    elif isinstance(value, list | tuple):
        for i, sub in enumerate(value):
            if type(sub) not in _PLAIN_TYPES:
                float_free = _walk(sub, f"{path}{i}.") and float_free
    else:
        return False  # a float, or a scalar of some other type
    return float_free


def check_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """Validate caller-supplied event fields; return a plain dict copy.

    Raises ``ValueError`` for reserved or secret-looking names and a missing
    ``event`` name, ``TypeError`` for values JSON cannot represent exactly.
    """
    return checked_event(event)[0]


def checked_event(event: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """:func:`check_event`, and whether the fields are float-free (for :func:`seal`)."""
    fields = dict(event)
    float_free = _walk(fields, "")
    taken = RESERVED_FIELDS.intersection(fields)
    if taken:
        raise ValueError(f"audit event must not set reserved field(s) {sorted(taken)}")
    name = fields.get("event")
    if not isinstance(name, str) or not name:
        raise ValueError("audit event needs a non-empty string field 'event'")
    return fields, float_free


def seal(record: dict[str, Any], *, float_free: bool = False) -> tuple[str, bytes]:
    """Add ``hash`` to ``record`` (in place); return it and the line to write.

    The record is encoded once, as the fields sorting before ``"hash"`` and
    those after it; the hashed bytes and the written line are both spliced
    from those two halves. Byte-identical to ``canonical(record)`` without and
    with ``hash`` (sorted keys: ``"hash"`` sits exactly between the halves;
    tests/unit/test_audit_seal.py checks against two full encodes), and ~25 %
    cheaper than encoding the whole record twice. ``float_free`` (the caller
    knows no value anywhere is a float, see :func:`checked_event`) lets the
    halves go through orjson, which is several times faster and, for such
    values, produces the same bytes or declines.
    """
    if "hash" in record:  # re-sealing: not the hot path, keep it obvious
        digest = hashlib.sha256(canonical(record)).hexdigest()
        record["hash"] = digest
        return digest, canonical(record) + b"\n"
    lo: dict[str, Any] = {}
    hi: dict[str, Any] = {}
    for key, value in record.items():
        if key < "hash":
            lo[key] = value
        else:
            hi[key] = value
    low = high = None
    if float_free:
        low = float_free_ascii_json(lo)
        high = float_free_ascii_json(hi) if low is not None else None
    if low is None or high is None:
        low = _encode(lo).encode("ascii")
        high = _encode(hi).encode("ascii")
    head = low[:-1]  # '{...' without '}', or just '{'
    tail = high[1:]  # '...}' without '{', or just '}'
    body = head + b"," + tail if len(head) > 1 and len(tail) > 1 else head + tail
    digest = hashlib.sha256(body).hexdigest()
    record["hash"] = digest
    pair = b'"hash":"' + digest.encode("ascii") + b'"'
    line = (head + b"," + pair if len(head) > 1 else head + pair) + (
        b"," + tail if len(tail) > 1 else tail)
    return digest, line + b"\n"


def record_hash(record: Mapping[str, Any]) -> str:
    """Recompute the hash of a parsed record (ignores its own ``hash`` field)."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_hex64(value: object) -> bool:
    # One regex, not a Python loop per character: that loop was a third of
    # `audit verify`'s time (issue 22).
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def parse_line(line: bytes) -> dict[str, Any]:
    """Parse and self-check one line (with or without its trailing newline).

    Checks structure, the record's own hash and canonical form -- everything
    that can be decided without neighbours. Chain links (``prev``/``seq``) and
    checkpoints are the caller's job because they need context.
    """
    text = line[:-1] if line.endswith(b"\n") else line
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError("malformed", f"not a JSON record: {exc}") from None
    if not isinstance(obj, dict):
        raise RecordError("malformed", "record is not a JSON object")
    seq = obj.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise RecordError("malformed", "missing or invalid 'seq'")
    for name in ("prev", "hash"):
        if not _is_hex64(obj.get(name)):
            raise RecordError("malformed", f"missing or invalid {name!r}")
    kind = obj.get("kind")
    if kind not in KINDS:
        raise RecordError("malformed", f"unknown kind {kind!r}")
    time = obj.get("time")
    if not isinstance(time, str):
        raise RecordError("malformed", "missing 'time'")
    try:
        parse_time(time)
    except ValueError:
        raise RecordError("malformed", f"invalid time {time!r}") from None
    if record_hash(obj) != obj["hash"]:
        raise RecordError("hash_mismatch", "hash does not match record content (record edited)")
    if canonical(obj) != text:
        raise RecordError("not_canonical", "record bytes are not in canonical form (re-encoded)")
    return obj


# -- checkpoints ---------------------------------------------------------------


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of the SubjectPublicKeyInfo DER: names the signing key."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def checkpoint_statement(fields: Mapping[str, Any]) -> bytes:
    """The exact bytes a checkpoint signature covers.

    Only the sealing facts (head hash and seq, key id, reason, time sealed),
    not the checkpoint record's own seq/prev: the signature is made off the
    hot path while other records keep being appended, so the checkpoint lands
    at whatever seq is next; its own position is protected by the chain.
    The span fields (:data:`CHECKPOINT_SPAN_FIELDS`) are covered when present.
    """
    statement = {name: fields[name] for name in CHECKPOINT_SIGNED_FIELDS}
    for name in CHECKPOINT_SPAN_FIELDS:
        # Signed whenever present: stripping or adding one breaks the signature.
        if name in fields:
            statement[name] = fields[name]
    return CHECKPOINT_DOMAIN + canonical(statement)


def encode_sig(der: bytes) -> str:
    """Base64 (standard alphabet, padded) of a DER ECDSA signature."""
    return base64.b64encode(der).decode("ascii")


def decode_sig(text: str) -> bytes:
    """Inverse of :func:`encode_sig`; raises ``ValueError`` on bad input."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def matches(record: Mapping[str, Any], *, agent: str | None = None,
            events: Sequence[str] | None = None) -> bool:
    """Filter used by tail/export: exact agent id, and event name prefixes."""
    if agent is not None and record.get("agent") != agent:
        return False
    if events:
        name = record.get("event")
        if not isinstance(name, str) or not any(name.startswith(p) for p in events):
            return False
    return True
