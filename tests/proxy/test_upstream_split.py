"""The per-route upstream split the proxy caches: the DPoP ``htu`` it builds by
concatenation must be exactly what RFC 9449's normalization gives for the URL
it calls (default port dropped, scheme and host lower-cased, path kept)."""

from __future__ import annotations

import pytest

from badged.core import dpop
from badged.policy.model import Route
from badged.proxy.server import _split_upstream


@pytest.mark.parametrize("upstream", [
    "https://API.Example.com:443/v2/",
    "https://api.example.com",
    "https://127.0.0.1:8443/base/path",
    "https://[::1]:443",
    "https://[::1]:9443/x",
])
def test_htu_by_concatenation_is_the_normalized_url(upstream: str) -> None:
    base = _split_upstream(Route(name="r", upstream=upstream, credential="dpop", timeout=7))
    for path in ("/", "/items/7", "/a%20b/c"):
        url = base.origin + base.path + path
        assert base.htu_prefix + base.path + path == dpop.normalize_htu(url)
    assert base.timeout.total == 7 and base.timeout.connect == 7
    assert not base.path.endswith("/")
