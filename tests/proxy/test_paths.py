"""Request-target normalization and path patterns (badged.proxy.paths), as tables.

The forwarded path is the matched path: each row states both, so a form the
policy reads one way and an upstream another cannot pass unnoticed.
"""

from __future__ import annotations

import pytest

from badged.proxy.paths import PathError, check_pattern, matches, normalize


@pytest.mark.parametrize(("raw", "path", "forwarded"), [
    ("/", "/", "/"),
    ("/items", "/items", "/items"),
    ("/items/", "/items/", "/items/"),
    ("/items//7", "/items/7", "/items/7"),
    ("///items", None, None),  # "//host" is a network-path reference: refused
    ("/a/./b", "/a/b", "/a/b"),
    ("/a/b/../c", "/a/c", "/a/c"),
    ("/a/%2e%2e/c", "/c", "/c"),
    ("/a/%2E/c", "/a/c", "/a/c"),
    ("/a;jsessionid=1/b", "/a/b", "/a/b"),
    ("/admin;x=/../public", "/public", "/public"),
    ("/a%20b", "/a b", "/a%20b"),
    ("/caf%C3%A9", "/café", "/caf%C3%A9"),
    ("/a%3Bb", "/a;b", "/a%3Bb"),  # a decoded ';' is data, re-encoded when forwarded
    ("/items?x=1&y=/..", "/items", "/items"),
])
def test_normalize(raw: str, path: str | None, forwarded: str | None) -> None:
    if path is None:
        with pytest.raises(PathError):
            normalize(raw)
        return
    t = normalize(raw)
    assert t.path == path
    assert t.encoded_path() == forwarded
    assert normalize(t.encoded_path()).path == path  # forwarding is a fixed point
    assert normalize(raw) == t  # the second time from the cache: the same answer


def test_the_cache_holds_short_accepted_targets_only() -> None:
    from badged.proxy import paths

    paths._CACHE.clear()
    with pytest.raises(PathError):
        normalize("/a/%2fb")
    long = "/" + "x" * 400  # 401 characters
    normalize(long)
    normalize("/items/7?q=1")
    assert list(paths._CACHE) == ["/items/7?q=1"]
    for i in range(paths._CACHE_MAX + 5):  # bounded, whatever an agent sends
        normalize(f"/n/{i}")
    assert len(paths._CACHE) <= paths._CACHE_MAX


@pytest.mark.parametrize("raw", [
    "/public/..%2Fadmin", "/public/%2f..%2fadmin", "/a%5Cb", "/a\\b", "/..", "/a/../..",
    "/%2e%2e/x", "/a/%252e%252e/x", "/a%00b", "/a%0ab", "/a%zz", "/a%e9", "/x#frag",
    "http://other/x", "*", "x/y", "/\u00e9", "/" + "a/" * 200,
])
def test_refused(raw: str) -> None:
    with pytest.raises(PathError):
        normalize(raw)


@pytest.mark.parametrize(("pattern", "path", "ok"), [
    ("/items", "/items", True),
    ("/items", "/items/", True),
    ("/items", "/items/7", False),
    ("/items/*", "/items/7", True),
    ("/items/*", "/items", False),
    ("/items/*", "/items/7/x", False),
    ("/items/**", "/items", True),
    ("/items/**", "/items/7/x", True),
    ("/items/**", "/itemsX", False),
    ("/**", "/anything/at/all", True),
    ("/", "/", True),
    ("/", "/x", False),
    ("/public/**", "/public/../admin", False),
])
def test_matches(pattern: str, path: str, ok: bool) -> None:
    try:
        segs = normalize(path).segments
    except PathError:
        segs = None
    assert (segs is not None and matches(check_pattern(pattern), segs)) is ok


@pytest.mark.parametrize("pattern", ["items", "/a/../b", "/a//b", "/a/%2e", "/a;x", "/a*",
                                     "/**/x", "/a\\b"])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(ValueError):
        check_pattern(pattern)
