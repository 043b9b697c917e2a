"""Request-target normalization and path patterns for the credential proxy.

Pure functions, no I/O (table-tested in ``tests/proxy/test_paths.py``).

The policy decides on a path, and the upstream acts on a path; if the two
can read the same bytes differently, an allow rule for ``/public/**`` lets
``/public/..%2Fadmin`` through to an upstream that decodes once more. So
the proxy normalizes the request target *once*, matches the result, and
forwards exactly that result (re-encoded), never the agent's bytes:

* percent-decoding of every segment (UTF-8);
* dot segments ``.`` and ``..`` resolved (RFC 3986 §5.2.4); a ``..`` above
  the root is refused;
* duplicate slashes collapsed;
* matrix parameters (``;name=value`` in a segment, which some servers strip)
  removed from every segment.

Refused as ambiguous (:class:`PathError`, answered 400): an encoded slash
or backslash (``%2F``, ``%5C``), a literal backslash, a ``%`` that survives
decoding (``%252e``: double encoding), NUL and control characters, an
invalid percent escape or non-UTF-8 bytes, a fragment, a target that is not
origin-form (``/...``), and anything over :data:`MAX_TARGET` bytes.

Patterns (written already decoded in the policy): absolute, segment by
segment; ``*`` is exactly one segment, ``**`` (last only) is any number of
further segments, including none; any other segment is literal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

MAX_TARGET = 8192
MAX_SEGMENTS = 128
# pchar (RFC 3986) minus ';' (a matrix parameter to some servers) and '%'.
_SAFE = "!$&'()*+,=:@-._~"
_PRINTABLE = re.compile(r"^[\x21-\x7e]*$")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")


class PathError(ValueError):
    """The request target is not one the proxy can read one way only."""


@dataclass(frozen=True, slots=True)
class Target:
    """A normalized request target: what is matched and what is forwarded."""

    segments: tuple[str, ...]  # decoded, no dot segments, no matrix params
    trailing_slash: bool
    query: str  # raw (validated printable ASCII), without '?'; "" if none
    # Both derived from segments and trailing_slash, once, by normalize():
    path: str  # the normalized path, decoded (for policy, audit and approvals)
    encoded: str  # the path as forwarded: each segment re-encoded, nothing else

    def encoded_path(self) -> str:
        """The path as forwarded: each segment re-encoded, nothing else."""
        return self.encoded


def _decode(segment: str) -> str:
    if _BAD_ESCAPE.search(segment):
        raise PathError("invalid percent escape")
    raw = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(segment):
        raw += segment[pos:m.start()].encode("ascii")
        byte = int(m.group(1), 16)
        if byte in (0x2F, 0x5C):
            raise PathError("encoded slash or backslash")
        raw.append(byte)
        pos = m.end()
    raw += segment[pos:].encode("ascii")
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise PathError("percent escapes are not UTF-8") from None
    if "%" in text:
        raise PathError("double percent-encoding")
    if _CONTROL.search(text):
        raise PathError("control character in path")
    return text


# Recent short targets, normalized: a pure function of the string, so an
# agent calling the same paths skips the parse (~20-30 us a call). Bounded:
# at most _CACHE_MAX entries of at most _CACHE_LEN characters; refused
# targets are never cached (each refusal is parsed, and audited, again).
_CACHE: dict[str, Target] = {}
_CACHE_MAX = 1024
_CACHE_LEN = 256


def normalize(target: str) -> Target:
    """Normalize an origin-form request target; PathError when ambiguous."""
    hit = _CACHE.get(target)
    if hit is not None:
        return hit
    raw_target = target
    if len(target) > MAX_TARGET:
        raise PathError("request target too long")
    if not target.startswith("/") or target.startswith("//"):
        # "//host/x" is a network-path reference to some parsers.
        raise PathError("request target must be a path (origin-form)")
    if not _PRINTABLE.match(target):
        raise PathError("request target must be printable ASCII")
    if "#" in target:
        raise PathError("fragment in request target")
    path, _, query = target.partition("?")
    if "\\" in path:
        raise PathError("backslash in path")
    raw_segments = path.split("/")[1:]
    if len(raw_segments) > MAX_SEGMENTS:
        raise PathError("too many path segments")
    out: list[str] = []
    trailing = False
    for raw in raw_segments:
        decoded = _decode(raw.split(";", 1)[0])
        trailing = decoded in ("", ".", "..")
        if decoded in ("", "."):
            continue
        if decoded == "..":
            if not out:
                raise PathError("path climbs above the root")
            out.pop()
            continue
        out.append(decoded)
    tail = "/" if trailing and out else ""
    result = Target(tuple(out), trailing, query, "/" + "/".join(out) + tail,
                    "/" + "/".join(quote(s, safe=_SAFE) for s in out) + tail)
    if len(raw_target) <= _CACHE_LEN:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[raw_target] = result
    return result


def check_pattern(pattern: str) -> tuple[str, ...]:
    """Validate a policy path pattern; its segments. ValueError with the reason."""
    if not pattern.startswith("/"):
        raise ValueError(f"path pattern {pattern!r} must start with '/'")
    if pattern == "/":
        return ()
    segs = tuple(pattern[1:].rstrip("/").split("/"))
    for i, seg in enumerate(segs):
        if seg in ("", ".", "..") or "%" in seg or ";" in seg or "\\" in seg \
                or _CONTROL.search(seg):
            raise ValueError(f"path pattern {pattern!r}: segment {seg!r} is not allowed "
                             f"(write patterns decoded, without dot segments, ';' or '//')")
        if "*" in seg and seg not in ("*", "**"):
            raise ValueError(f"path pattern {pattern!r}: '*' must be a whole segment")
        if seg == "**" and i != len(segs) - 1:
            raise ValueError(f"path pattern {pattern!r}: '**' only as the last segment")
    return segs


def matches(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    """Does a checked pattern match normalized segments? (trailing slash ignored)"""
    if pattern and pattern[-1] == "**":
        head = pattern[:-1]
        if len(segments) < len(head):
            return False
        segments = segments[:len(head)]
        pattern = head
    if len(pattern) != len(segments):
        return False
    return all(p == "*" or p == s for p, s in zip(pattern, segments, strict=True))


def check_method(method: str) -> str:
    """A policy method name: upper-case HTTP token."""
    if not _METHOD.match(method):
        raise ValueError(f"method {method!r} must be an upper-case HTTP method like GET")
    return method
