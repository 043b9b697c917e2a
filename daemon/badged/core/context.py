"""Request context: what the agent *says* it is working on (issue 21).

A credential request may carry a small, typed context -- the channel, the
task or ticket, the session, an on-behalf-of hint. The daemon cannot attest
any of it: the kernel tells it which *process* is calling, not which Slack
channel or ticket that process is serving. So the context is the agent's
assertion, and badged uses it in exactly two ways:

* to **narrow** what a step-up grant or a bundle allows (a grant scoped to
  ``channel=#deploy`` applies only to requests that say ``channel=#deploy``),
  so an agent talked into acting elsewhere by a prompt injection cannot use
  that grant there *without also lying about the context*; and
* to **record** it: in the token (claim ``ctx``) so a relying party can
  enforce the same, in the approval an operator sees, and in the audit log.

It is never proof of the context: an agent that is fully compromised can
claim ``channel=#deploy`` anywhere. What it buys is that the lie is on
record, signed, in every credential and audit record it obtains.

Bounded before anything else looks at it: at most :data:`MAX_ENTRIES` keys
from :data:`KEYS`, each value 1..:data:`MAX_VALUE` printable ASCII characters
without spaces, so a context costs at most a few hundred bytes in a token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from badged.errors import InvalidRequestError

# The typed set: a closed list, so a relying party knows what each key means
# and a request cannot smuggle arbitrary claims into a token.
KEYS: tuple[str, ...] = ("channel", "task", "session", "on_behalf_of")
MAX_ENTRIES = len(KEYS)
MAX_VALUE = 128
_VALUE = re.compile(r"^[\x21-\x7e]{1,128}$")  # 1..MAX_VALUE

# Sorted (key, value) pairs: hashable (requests and grants are frozen
# dataclasses) and one canonical spelling for the same context.
Context = tuple[tuple[str, str], ...]
EMPTY: Context = ()


def _bad(detail: str) -> InvalidRequestError:
    return InvalidRequestError(f"bad context: {detail}", public=f"context: {detail}")


def parse(pairs: Mapping[str, str] | Iterable[tuple[str, str]]) -> Context:
    """Validate and canonicalise; InvalidRequestError (INVALID_ARGUMENT) says what is wrong.

    Checks the count first, so an oversized map costs nothing more.
    """
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    if not items:
        return EMPTY
    if len(items) > MAX_ENTRIES:
        raise _bad(f"at most {MAX_ENTRIES} entries ({', '.join(KEYS)})")
    seen: dict[str, str] = {}
    for key, value in items:
        if key not in KEYS:
            raise _bad(f"unknown key {key[:32]!r} (known: {', '.join(KEYS)})")
        if key in seen:
            raise _bad(f"key {key!r} given twice")
        if not isinstance(value, str) or not _VALUE.match(value):
            raise _bad(f"{key} must be 1-{MAX_VALUE} printable ASCII characters, no spaces")
        seen[key] = value
    return tuple(sorted(seen.items()))


def parse_cli(values: Iterable[str]) -> Context:
    """``k=v`` strings (``--context channel=#deploy``), validated like a request."""
    pairs: list[tuple[str, str]] = []
    for text in values:
        key, sep, value = text.partition("=")
        if not sep:
            raise _bad(f"{text[:40]!r} is not key=value")
        pairs.append((key.strip(), value.strip()))
    return parse(pairs)


def satisfies(wanted: Context, have: Context) -> bool:
    """Whether a request context ``have`` carries every pair of ``wanted``."""
    if not wanted:
        return True
    return set(wanted) <= set(have)


def claim(ctx: Context) -> dict[str, str]:
    """The token claim ``ctx`` (and the audit field): a plain JSON object."""
    return dict(ctx)


def text(ctx: Context) -> str:
    """``channel=#deploy,task=INC-42`` for humans (approvals, grant lists)."""
    return ",".join(f"{k}={v}" for k, v in ctx)


# W3C Trace Context (https://www.w3.org/TR/trace-context/#traceparent-header):
# version 00, 32-hex trace id, 16-hex parent id, 2-hex flags; all-zero ids
# are invalid. Exactly 55 characters, so the bound is the format itself.
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def traceparent(value: str) -> str:
    """A caller's ``traceparent``, validated ("" when none); INVALID_ARGUMENT otherwise."""
    if not value:
        return ""
    m = _TRACEPARENT.match(value) if len(value) == 55 else None
    if m is None or m.group(1) == "0" * 32 or m.group(2) == "0" * 16:
        raise InvalidRequestError(
            "bad traceparent",
            public="traceparent must be a W3C trace context: 00-<32 hex>-<16 hex>-<2 hex>, "
                   "ids not all zero")
    return value


def trace_id(tp: str) -> str:
    """The trace id of a validated traceparent ("" when none)."""
    return tp[3:35] if tp else ""
