"""An MCP server whose tools need different scopes, accepting only badged tokens.

    badgectl jwks > jwks.json                       # the daemon's keys (no secret)
    python server.py http://127.0.0.1:8765/mcp jwks.json

``read_notes`` needs ``notes:read``, ``write_note`` needs ``notes:write``, and
``wipe`` is in no list, so nobody may call it (ToolScopes refuses tools it has
no entry for). An agent sees in ``tools/list`` only what its token allows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from pydantic import AnyHttpUrl
from starlette.types import ASGIApp

from badgeclient.mcp_auth import BadgeTokenVerifier, ToolScopes, dpop_asgi


def build(resource: str, jwks: dict[str, Any], *, min_assurance: str | None = None
          ) -> tuple[ASGIApp, BadgeTokenVerifier]:
    """The ASGI app (serve it with uvicorn) and its verifier."""
    verifier = BadgeTokenVerifier(resource=resource, jwks=jwks, min_assurance=min_assurance)
    scopes = ToolScopes()
    server = MCPServer(
        "notes", token_verifier=verifier, middleware=[scopes],
        # issuer_url is what the protected-resource metadata advertises; badged
        # issues the tokens locally, so it names this server's origin.
        auth=AuthSettings(issuer_url=AnyHttpUrl(resource.rsplit("/", 1)[0]),
                          resource_server_url=AnyHttpUrl(resource), validate_token_resource=True))
    notes: list[str] = []

    @scopes.require("notes:read")
    @server.tool()
    def read_notes() -> list[str]:
        """All notes."""
        return list(notes)

    @scopes.require("notes:write")
    @server.tool()
    def write_note(text: str) -> str:
        """Add a note; says who wrote it (the agent, from its verified token)."""
        token = get_access_token()
        assert token is not None  # the SDK's auth middleware ran
        notes.append(text)
        bound = " (DPoP)" if (token.claims or {}).get("cnf") else ""
        return f"written by {token.client_id}{bound}"

    @server.tool()
    def wipe() -> str:
        """Not in ToolScopes: refused for every token."""
        notes.clear()
        return "wiped"

    app = server.streamable_http_app(streamable_http_path=urlsplit(resource).path or "/mcp")
    # DPoP-bound tokens (Authorization: DPoP + a proof) as well as Bearer.
    return dpop_asgi(app, resource=resource), verifier


if __name__ == "__main__":
    import uvicorn

    url, jwks_path = sys.argv[1], sys.argv[2]
    app, _ = build(url, json.loads(Path(jwks_path).read_text()))
    parts = urlsplit(url)
    uvicorn.run(app, host=parts.hostname or "127.0.0.1", port=parts.port or 80)
