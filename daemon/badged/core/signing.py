"""Domain-separated signatures over caller data.

``Sign`` uses a *separate* per-agent key, and the signed bytes always start
with ``SIGN_PREFIX``, which contains a NUL byte. A JWS signing input is
base64url text and can never contain NUL, so no ``Sign`` result can ever be a
valid signature over a token -- even if a verifier were tricked into trusting
the signing key for tokens. Two independent defences, each tested.
"""

from __future__ import annotations

import re

from badged.errors import InvalidRequestError

SIGN_PREFIX = b"badged-sign-v1\x00"
MAX_SIGN_DATA = 64 * 1024
_CONTEXT_RE = re.compile(r"^[A-Za-z0-9._:/+-]{0,64}$")


def signed_message(context: str, data: bytes) -> bytes:
    """The exact bytes a ``Sign`` signature covers."""
    if not _CONTEXT_RE.match(context):
        raise InvalidRequestError(
            "bad sign context", public="context must be 0-64 chars of [A-Za-z0-9._:/+-]"
        )
    if len(data) > MAX_SIGN_DATA:
        raise InvalidRequestError(
            "sign data too large", public=f"data must be at most {MAX_SIGN_DATA} bytes"
        )
    return SIGN_PREFIX + context.encode("ascii") + b"\x00" + data
