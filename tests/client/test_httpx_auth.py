"""BadgeAuth (httpx) against a real resource server on loopback that checks
every request with the project's verifier, tokens from a real ``badged dev``.

The server asks for a DPoP nonce the first time (RFC 9449 §9), refuses a
token it was told to refuse (``invalid_token``), and counts what it saw, so
each retry rule is performed for real.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from badgeclient.httpx_auth import BadgeAuth
from badgeclient.pytest_plugin import BadgedDev, TomlValue, start_badged_dev
from badgeclient.tokensource import AsyncTokenSource, TokenSource
from badgeclient.verify import DpopRequest, ReplayCache, VerificationError, Verifier
from tests.e2e.conftest import softhsm_available

__all__ = ["softhsm_available"]

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

RS = "https://rs.example.com"
AGENT = "kit-agent"


@dataclass
class ResourceServer:
    """``GET /orders``: Bearer or DPoP, verified; ``/nonce`` paths demand a DPoP nonce."""

    httpd: ThreadingHTTPServer
    jwks: dict[str, Any] = field(default_factory=dict)
    nonce: str = "n-1"
    refuse: set[str] = field(default_factory=set)
    refuse_all: bool = False
    seen: list[tuple[str, int, str]] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    # One replay cache for the server's life: DPoP proofs are single-use;
    # access tokens are reused by design (the client caches them).
    replay: ReplayCache = field(default_factory=ReplayCache)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def check(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
        self.headers_seen.append(headers)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if token in self.refuse or self.refuse_all:
            return 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, "refused"
        verifier = Verifier(jwks=self.jwks, replay_cache=self.replay, single_use_tokens=False)
        dpop = None
        if scheme == "DPoP":
            proof = headers.get("dpop", "")
            if path.startswith("/nonce"):
                claims = json.loads(_b64(proof.split(".")[1]))
                if claims.get("nonce") != self.nonce:
                    return 401, {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"',
                                 "DPoP-Nonce": self.nonce}, "nonce"
            dpop = DpopRequest(proof=proof, htm=method, htu=self.origin + path,
                               nonce=self.nonce if path.startswith("/nonce") else None)
        elif scheme != "Bearer":
            return 401, {"WWW-Authenticate": "Bearer"}, "no token"
        try:
            ok = verifier.verify_token(token, audience=RS, dpop=dpop, require_dpop=scheme == "DPoP")
        except VerificationError as exc:
            return 401, {"WWW-Authenticate": f'{scheme} error="invalid_token"'}, exc.reason
        return 200, {}, json.dumps({"agent": ok.agent, "scopes": list(ok.scopes),
                                    "dpop": ok.dpop_jkt is not None})


def _b64(seg: str) -> bytes:
    import base64
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def _serve() -> ResourceServer:
    server: ResourceServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._handle()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self._handle()

        def _handle(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, body = server.check(self.command, self.path, headers)
            server.seen.append((self.command + " " + self.path, status, body if status != 200 else ""))
            data = body.encode()
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server = ResourceServer(httpd)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def world(softhsm_available: None) -> Iterator[tuple[BadgedDev, ResourceServer]]:
    rs = _serve()
    # DPoP proofs are policy-checked against the origin they are for.
    policy: dict[str, TomlValue] = {
        "bundle": {"rs": {"audiences": [RS, rs.origin], "scopes": ["read"],
                          "kinds": ["token", "dpop"], "max_ttl": "10m"}},
        "agent": [{"name": AGENT, "selectors": [f"unix:uid:{os.getuid()}"], "bundles": ["rs"]}],
    }
    try:
        with start_badged_dev(policy=policy, agent=AGENT) as dev:
            rs.jwks = dev.client.jwks()
            yield dev, rs
    finally:
        rs.httpd.shutdown()


def test_bearer_token_is_cached_across_requests(world: tuple[BadgedDev, ResourceServer]) -> None:
    dev, rs = world
    rs.seen.clear()
    with dev.token_source() as tokens:
        auth = BadgeAuth(tokens, audience=RS, scopes=["read"])
        with httpx.Client(auth=auth) as http:
            for _ in range(3):
                r = http.get(rs.origin + "/orders")
                assert r.status_code == 200, r.text
                assert r.json()["agent"].endswith("/" + AGENT)
        assert tokens.fetches == 1
        assert len({h["authorization"] for h in rs.headers_seen[-3:]}) == 1
        assert "token=" not in repr(auth) and "ey" not in repr(auth)


def test_invalid_token_is_dropped_and_retried_once(world: tuple[BadgedDev, ResourceServer]) -> None:
    dev, rs = world
    with dev.token_source() as tokens:
        first = tokens.token(RS, ["read"])
        rs.refuse.add(first.token)
        auth = BadgeAuth(tokens, audience=RS, scopes=["read"])
        rs.seen.clear()
        r = httpx.get(rs.origin + "/orders", auth=auth)
        assert r.status_code == 200
        assert [s for _, s, _ in rs.seen] == [401, 200]
        assert tokens.token(RS, ["read"]).jti != first.jti
        # A server that refuses every token: one retry, then the 401 reaches the caller.
        rs.refuse_all = True
        rs.seen.clear()
        try:
            r = httpx.get(rs.origin + "/orders", auth=auth)
        finally:
            rs.refuse_all = False
        assert r.status_code == 401
        assert [s for _, s, _ in rs.seen] == [401, 401]


def test_dpop_with_nonce_challenge(world: tuple[BadgedDev, ResourceServer]) -> None:
    dev, rs = world
    rs.seen.clear()
    with dev.token_source() as tokens:
        auth = BadgeAuth(tokens, audience=RS, scopes=["read"], agent=AGENT, dpop=True,
                         socket_path=dev.workload_socket)
        with httpx.Client(auth=auth) as http:
            r = http.get(rs.origin + "/nonce/orders?page=2")
            assert r.status_code == 200, (r.text, rs.seen)
            assert r.json()["dpop"] is True
            # The nonce is remembered: the next request needs no challenge.
            r = http.post(rs.origin + "/nonce/orders", content=b"{}")
            assert r.status_code == 200, (r.text, rs.seen)
            r = http.get(rs.origin + "/orders")
            assert r.status_code == 200, (r.text, rs.seen)
        assert [s for _, s, _ in rs.seen] == [401, 200, 200, 200]
        # Every request carried its own proof; the same bound token.
        proofs = [h["dpop"] for h in rs.headers_seen[-4:]]
        assert len(set(proofs)) == 4
        assert {h["authorization"].split()[0] for h in rs.headers_seen[-4:]} == {"DPoP"}
        assert tokens.fetches == 1
        auth.close()
    # A stolen DPoP-bound token with the proof replayed: refused by the server.
    stolen = rs.headers_seen[-1]
    r = httpx.get(rs.origin + "/orders", headers={"Authorization": stolen["authorization"],
                                                  "DPoP": stolen["dpop"]})
    assert r.status_code == 401
    assert rs.seen[-1][2] == "replayed"
    # ... and as a plain Bearer token.
    r = httpx.get(rs.origin + "/orders",
                  headers={"Authorization": "Bearer " + stolen["authorization"].split()[1]})
    assert r.status_code == 401


def test_async_client_with_async_source(world: tuple[BadgedDev, ResourceServer]) -> None:
    dev, rs = world

    async def main() -> None:
        async with AsyncTokenSource(dev.workload_socket) as tokens:
            auth = BadgeAuth(tokens, audience=RS, scopes=["read"], agent=AGENT, dpop=True,
                             socket_path=dev.workload_socket)
            async with httpx.AsyncClient(auth=auth) as http:
                rs_ = await asyncio.gather(*(http.get(rs.origin + "/orders") for _ in range(5)))
            assert [r.status_code for r in rs_] == [200] * 5
            assert tokens.fetches == 1
            auth.close()
        # A sync source in an async client works too (its calls go to a thread).
        with TokenSource(dev.workload_socket) as sync_tokens:
            async with httpx.AsyncClient(auth=BadgeAuth(sync_tokens, audience=RS)) as http:
                assert (await http.get(rs.origin + "/orders")).status_code == 200

    asyncio.run(main())


def test_dpop_proofs_prefetched_for_a_run_of_calls(world: tuple[BadgedDev, ResourceServer]) -> None:
    """Calls to one endpoint in a row use proofs fetched in the background, each once, each
    accepted by the server; with prefetch off, every proof is made for its request."""
    dev, rs = world
    with dev.token_source() as tokens:
        for prefetch in (True, False):
            auth = BadgeAuth(tokens, audience=RS, scopes=["read"], agent=AGENT, dpop=True,
                             socket_path=dev.workload_socket, prefetch_proofs=prefetch)
            rs.seen.clear()
            with httpx.Client(auth=auth) as http:
                for page in range(6):
                    r = http.get(rs.origin + f"/orders?page={page}")  # htu has no query
                    assert r.status_code == 200, (r.text, rs.seen)
                    time.sleep(0.1)  # let the background fetch land
            used = auth._core.spares_used
            auth.close()
            assert used >= 3 if prefetch else used == 0, used
            proofs = [h["dpop"] for h in rs.headers_seen[-6:]]
            assert len(set(proofs)) == 6
