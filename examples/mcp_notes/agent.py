"""An agent calling the notes MCP server with its badged credentials.

    python agent.py http://127.0.0.1:8765/mcp notes:read          # lists and reads
    python agent.py http://127.0.0.1:8765/mcp notes:read notes:write --write "hello"

It asks the daemon for a token for the server's URL with the scopes given:
the daemon refuses scopes its policy bundle does not grant, and the server
refuses tools those scopes do not cover.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence

from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from badgeclient import AsyncTokenSource
from badgeclient.mcp_auth import mcp_http_client


async def run(url: str, scopes: Sequence[str], *, write: str | None = None, agent: str | None = None,
              dpop: bool = False, socket: str | None = None) -> dict[str, object]:
    """List the tools this agent may call, read the notes, optionally write one."""
    socket = socket or os.environ.get("BADGED_SOCKET")
    async with AsyncTokenSource(socket) as tokens, \
            mcp_http_client(tokens, resource=url, scopes=scopes, agent=agent, dpop=dpop,
                            socket_path=socket) as http, \
            Client(streamable_http_client(url, http_client=http)) as mcp:
        tools = sorted(t.name for t in (await mcp.list_tools()).tools)
        out: dict[str, object] = {"tools": tools}
        if "read_notes" in tools:
            out["notes"] = (await mcp.call_tool("read_notes", {})).structured_content
        if write is not None:
            result = await mcp.call_tool("write_note", {"text": write})
            out["write"] = result.structured_content
        return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("scopes", nargs="*")
    p.add_argument("--write")
    p.add_argument("--agent")
    p.add_argument("--dpop", action="store_true")
    a = p.parse_args()
    print(asyncio.run(run(a.url, a.scopes, write=a.write, agent=a.agent, dpop=a.dpop)))
