"""badgeclient.mcp_auth with the real MCP SDK: the example notes server
(examples/mcp_notes/server.py) on uvicorn over loopback, the example agent's
streamable HTTP client, tokens and DPoP proofs from a real ``badged dev``.

Two agents on the test's uid: ``notes-reader`` (bundle: notes:read) and
``notes-writer`` (notes:read + notes:write). Each sees and can call only the
tools its bundle's scopes cover; the server refuses the rest even when asked
directly, and refuses tokens for another audience, no token, and tokens below
its minimum assurance.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import httpx
import pytest
import uvicorn
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from badgeclient import AsyncTokenSource, PolicyDeniedError
from badgeclient.mcp_auth import BadgeTokenVerifier, mcp_http_client
from badgeclient.pytest_plugin import BadgedDev, TomlValue, start_badged_dev
from tests.conftest import ROOT
from tests.e2e.conftest import softhsm_available

__all__ = ["softhsm_available"]

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

EXAMPLE = ROOT / "examples" / "mcp_notes"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "0"}}}
HEADERS = {"Accept": "application/json, text/event-stream"}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"mcp_notes_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@dataclass
class World:
    dev: BadgedDev
    url: str
    verifier: BadgeTokenVerifier
    agent: ModuleType


@pytest.fixture(scope="module")
def world(softhsm_available: None) -> Iterator[World]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    origin = f"http://127.0.0.1:{sock.getsockname()[1]}"
    url = origin + "/mcp"
    uid = os.getuid()

    def bundle(*scopes: str) -> dict[str, TomlValue]:
        # DPoP proofs are policy-checked against the origin they are for.
        return {"audiences": [url, origin], "scopes": list(scopes), "kinds": ["token", "dpop"],
                "max_ttl": "10m"}

    policy: dict[str, TomlValue] = {
        "bundle": {"reader": bundle("notes:read"), "writer": bundle("notes:read", "notes:write")},
        "agent": [{"name": "notes-reader", "selectors": [f"unix:uid:{uid}"], "bundles": ["reader"]},
                  {"name": "notes-writer", "selectors": [f"unix:uid:{uid}", f"unix:gid:{os.getgid()}"],
                   "bundles": ["writer"]}],
    }
    with start_badged_dev(policy=policy, agent="notes-reader") as dev:
        with dev.admin() as admin:  # badged dev creates the one agent it is told
            admin.create_agent("notes-writer")
        app, verifier = _load("server").build(url, dev.client.jwks())
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        try:
            yield World(dev, url, verifier, _load("agent"))
        finally:
            server.should_exit = True
            thread.join(10)


def _run(w: World, scopes: list[str], **kw: object) -> dict[str, object]:
    result: dict[str, object] = asyncio.run(
        w.agent.run(w.url, scopes, socket=str(w.dev.workload_socket), **kw))
    return result


def test_each_agent_sees_and_calls_only_its_tools(world: World) -> None:
    reader = _run(world, ["notes:read"], agent="notes-reader")
    assert reader == {"tools": ["read_notes"], "notes": {"result": []}}
    writer = _run(world, ["notes:read", "notes:write"], agent="notes-writer", write="hello")
    assert writer["tools"] == ["read_notes", "write_note"]  # never "wipe": in no scope list
    assert writer["write"] == {"result": "written by spiffe://example.org/agent/notes-writer"}
    assert _run(world, ["notes:read"], agent="notes-reader")["notes"] == {"result": ["hello"]}
    # The reader asking the daemon for notes:write: its bundle does not grant it.
    with pytest.raises(PolicyDeniedError):
        world.dev.client.fetch_token(audience=world.url, scopes=["notes:write"], agent="notes-reader")


def test_server_refuses_tools_outside_the_token_scopes(world: World) -> None:
    async def main() -> None:
        async with AsyncTokenSource(world.dev.workload_socket) as tokens, \
                mcp_http_client(tokens, resource=world.url, scopes=["notes:read"],
                                agent="notes-reader") as http, \
                Client(streamable_http_client(world.url, http_client=http)) as mcp:
            for tool, args in (("write_note", {"text": "x"}), ("wipe", {})):
                with pytest.raises(MCPError) as info:
                    await mcp.call_tool(tool, args)
                assert "insufficient_scope" in str(info.value)
            assert (await mcp.call_tool("read_notes", {})).is_error is False
    asyncio.run(main())


def test_dpop_bound_token(world: World) -> None:
    before = dict(world.verifier.refusals)
    out = _run(world, ["notes:read", "notes:write"], agent="notes-writer", dpop=True, write="bound")
    assert out["write"] == {"result": "written by spiffe://example.org/agent/notes-writer (DPoP)"}
    assert world.verifier.refusals == before
    # The bound token without its proof (stolen, replayed as Bearer): refused.
    bound = world.dev.client.fetch_token(audience=world.url, scopes=["notes:read"],
                                         agent="notes-reader", dpop_bound=True)
    r = httpx.post(world.url, json=INIT, headers={**HEADERS, "Authorization": f"Bearer {bound.token}"})
    assert r.status_code == 401 and world.verifier.refusals.get("missing_proof") == 1


def test_wrong_audience_no_token_and_low_assurance_refused(world: World) -> None:
    r = httpx.post(world.url, json=INIT, headers=HEADERS)
    assert r.status_code == 401
    other = world.dev.client.fetch_token(audience=world.url.rsplit("/", 1)[0], scopes=["notes:read"],
                                         agent="notes-reader")
    r = httpx.post(world.url, json=INIT, headers={**HEADERS, "Authorization": f"Bearer {other.token}"})
    assert r.status_code == 401 and world.verifier.refusals.get("wrong_audience", 0) >= 1
    good = world.dev.client.fetch_token(audience=world.url, scopes=["notes:read"], agent="notes-reader")
    strict = BadgeTokenVerifier(resource=world.url, jwks=world.dev.client.jwks(),
                                min_assurance="advanced")
    assert asyncio.run(strict.verify_token(good.token)) is None
    assert strict.refusals == {"assurance_too_low": 1}
    lax = BadgeTokenVerifier(resource=world.url, jwks=world.dev.client.jwks())
    ok = asyncio.run(lax.verify_token(good.token))
    assert ok is not None and ok.client_id.endswith("/notes-reader") and ok.scopes == ["notes:read"]


def test_verifier_reloads_the_jwks_for_a_new_key_at_most_every_interval(world: World) -> None:
    """A key the server has not seen (the daemon rotated): the JWKS is loaded again, once per
    interval, and the token accepted; a stream of unknown keys does not reload it each time."""
    real = world.dev.client.jwks()
    stale = {k: v for k, v in real.items() if k != "keys"} | {"keys": []}
    docs = [stale, real]
    loads: list[int] = []

    def load() -> dict[str, object]:
        loads.append(1)
        return docs[min(len(loads) - 1, 1)]

    good = world.dev.client.fetch_token(audience=world.url, scopes=["notes:read"], agent="notes-reader")
    v = BadgeTokenVerifier(resource=world.url, jwks=load, jwks_refresh=0.5)
    assert asyncio.run(v.verify_token(good.token)) is None  # loaded just now: no reload yet
    assert v.refusals == {"unknown_kid": 1} and len(loads) == 1
    time.sleep(0.6)
    ok = asyncio.run(v.verify_token(good.token))
    assert ok is not None and v.jwks_reloads == 1 and len(loads) == 2
    v2 = BadgeTokenVerifier(resource=world.url, jwks=lambda: stale, jwks_refresh=60)
    for _ in range(5):
        assert asyncio.run(v2.verify_token(good.token)) is None
    assert v2.jwks_reloads == 0 and v2.refusals == {"unknown_kid": 5}
