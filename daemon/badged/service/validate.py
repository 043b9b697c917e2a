"""Request validation at the edge: bounds and character sets, before any work."""

from __future__ import annotations

import re

from badged.errors import InvalidRequestError

MAX_AUDIENCE = 512
MAX_SCOPES = 32
MAX_SCOPE_LEN = 128
MAX_TTL_REQUEST = 24 * 3600
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


def audience(value: str) -> str:
    if not value:
        raise InvalidRequestError("empty audience", public="audience is required")
    if len(value) > MAX_AUDIENCE or not _PRINTABLE.match(value):
        raise InvalidRequestError(
            "bad audience", public=f"audience must be 1-{MAX_AUDIENCE} printable ASCII chars"
        )
    return value


def scopes(values: list[str]) -> tuple[str, ...]:
    if len(values) > MAX_SCOPES:
        raise InvalidRequestError("too many scopes", public=f"at most {MAX_SCOPES} scopes")
    for s in values:
        if not s or len(s) > MAX_SCOPE_LEN or not _PRINTABLE.match(s):
            raise InvalidRequestError(
                "bad scope", public=f"each scope must be 1-{MAX_SCOPE_LEN} printable ASCII chars"
            )
    # Keep request order but drop duplicates: the token carries each once.
    return tuple(dict.fromkeys(values))


def ttl(value: int) -> int:
    if value < 0 or value > MAX_TTL_REQUEST:
        raise InvalidRequestError("bad ttl", public=f"ttl_seconds must be 0..{MAX_TTL_REQUEST}")
    return value


def agent_name(value: str) -> str | None:
    if not value:
        return None
    from badged.identity.registry import check_agent_name

    return check_agent_name(value)


_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def opaque_id(value: str, what: str) -> str | None:
    if not value:
        return None
    if not _ID_RE.match(value):
        raise InvalidRequestError(f"bad {what} id", public=f"{what} must be an id like d-abc123")
    return value


def reason(value: str) -> str:
    if len(value) > 256 or any(ord(c) < 0x20 for c in value):
        raise InvalidRequestError("bad reason", public="reason: at most 256 printable chars")
    return value
