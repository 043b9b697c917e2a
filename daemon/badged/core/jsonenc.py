"""Compact, key-sorted JSON encoders built once (audit records, JWS segments).

``json.dumps`` with options builds a ``JSONEncoder`` on every call, and
``JSONEncoder.encode`` builds a C encoder object on every call (~0.8 µs
each); on the request path that is a measurable share of an audit append or a
token. This builds the C encoder once with exactly the arguments
``JSONEncoder.iterencode`` would pass, except ``markers=None``: no
circular-reference bookkeeping, since what we encode are trees (audit events
are walked by ``check_event`` first; claim sets are built here), and a
shared markers dict could be left dirty by a failed encode.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson


def sorted_compact_encoder(*, ensure_ascii: bool, allow_nan: bool) -> Callable[[Any], str]:
    """Equivalent of ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ...)``."""
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"),
                               ensure_ascii=ensure_ascii, allow_nan=allow_nan)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has _json
        return encoder.encode
    escape = (json.encoder.encode_basestring_ascii if ensure_ascii
              else json.encoder.encode_basestring)
    iterencode = make(None, encoder.default, escape, None, encoder.key_separator,
                      encoder.item_separator, True, False, allow_nan)
    join = "".join

    def encode(obj: Any) -> str:
        return join(iterencode(obj, 0))

    return encode


ORJSON_SORTED: int = orjson.OPT_SORT_KEYS
"""orjson options of every orjson encoding in badged: sorted keys, compact."""


def float_free_ascii_json(obj: Any) -> bytes | None:
    """orjson's encoding of ``obj`` when it is exactly the canonical one, else None.

    The canonical form (sorted keys, compact, ``ensure_ascii``, no NaN) is
    defined by the stdlib encoder above; orjson is ~5-8x faster. The two agree
    byte for byte on dicts with str keys, lists, tuples, str, int, bool and None
    *except* where a string needs escaping (orjson writes non-ASCII and DEL
    raw and may spell control characters differently) and on floats (exponent
    notation differs: ``1e-05`` against ``0.00001``; NaN becomes ``null``). So:
    the caller guarantees there is no float anywhere in ``obj``; any escape,
    non-ASCII byte or DEL in the output means None (the caller then uses the
    stdlib encoder); so does anything orjson refuses (ints beyond 64 bits,
    non-str keys, unknown types). tests/unit/test_audit_seal.py checks the
    agreement on random records against the definition.
    """
    try:
        out = orjson.dumps(obj, option=ORJSON_SORTED)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None
    if b"\\" in out or b"\x7f" in out or not out.isascii():
        return None
    return out
