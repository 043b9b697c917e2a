"""badged credentials for the Model Context Protocol Python SDK (``badgeclient[mcp]``).

**Agent side** -- an MCP client on the streamable HTTP transport, authenticated
with a badged token whose audience is the MCP server's resource URL::

    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client
    from badgeclient import AsyncTokenSource
    from badgeclient.mcp_auth import mcp_http_client

    async with AsyncTokenSource() as tokens, \\
            mcp_http_client(tokens, resource=URL, scopes=["notes:read"]) as http, \\
            Client(streamable_http_client(URL, http_client=http)) as mcp:
        await mcp.call_tool("read_notes", {})

**Server side** -- an ``MCPServer`` that accepts only badged tokens for its
own URL, and a scope per tool::

    from mcp.server.auth.settings import AuthSettings
    from mcp.server.mcpserver import MCPServer
    from badgeclient.mcp_auth import BadgeTokenVerifier, ToolScopes

    scopes = ToolScopes()
    server = MCPServer("notes", token_verifier=BadgeTokenVerifier(resource=URL, jwks=jwks),
                       auth=AuthSettings(issuer_url=ISSUER, resource_server_url=URL,
                                         validate_token_resource=True),
                       middleware=[scopes])

    @scopes.require("notes:write")
    @server.tool()
    def write_note(text: str) -> str: ...

The verifier checks a token as ``badgeclient.verify`` does (signature against
the daemon's JWKS, issuer, ``aud`` = the server's resource URL, expiry,
revocations, ``min_assurance``), and with :func:`dpop_asgi` around the app,
a DPoP proof for tokens bound to a key (``require_dpop=True`` refuses
bearer tokens). Tokens are not single-use here: an MCP session presents the
same token on every HTTP request, and agents cache tokens (``TokenSource``);
a stolen token is what DPoP binding addresses. ``tools/list`` shows a caller
only the tools its token's scopes allow, and ``tools/call`` refuses the rest.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import httpx2
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, ListToolsResult
from starlette.types import ASGIApp, Receive, Scope, Send

from badgeclient._authcore import AuthCore
from badgeclient.client import Token
from badgeclient.tokensource import AsyncTokenSource, TokenSource
from badgeclient.verify import DpopRequest, ReplayCache, VerificationError, VerifiedToken, Verifier

_logger = logging.getLogger(__name__)
#: The MCP SDK's recommended client timeouts (mcp.shared's create_mcp_http_client).
MCP_TIMEOUT = 30.0
MCP_READ_TIMEOUT = 300.0
F = TypeVar("F", bound=Callable[..., object])

# -- the agent: an httpx2.Auth for the SDK's streamable HTTP client ------------------------


class BadgeMCPAuth(httpx2.Auth):
    """``Authorization: Bearer`` (or ``DPoP`` + proof) with a badged token for an MCP server.

    ``resource`` is the server's URL (its OAuth protected-resource identifier):
    the token's audience. The rules are :mod:`badgeclient.httpx_auth`'s (one
    shared core): a nonce challenge or a 401 ``invalid_token`` is retried once.
    """

    requires_request_body = True

    def __init__(self, tokens: TokenSource | AsyncTokenSource, *, resource: str,
                 scopes: Sequence[str] = (), agent: str | None = None, dpop: bool = False,
                 socket_path: str | os.PathLike[str] | None = None, timeout: float = 10.0,
                 prefetch_proofs: bool = True) -> None:
        self._core = AuthCore(tokens, audience=resource, scopes=scopes, agent=agent, dpop=dpop,
                              socket_path=socket_path, timeout=timeout,
                              prefetch_proofs=prefetch_proofs)

    def __repr__(self) -> str:
        return f"BadgeMCPAuth(resource={self._core.audience!r}, dpop={self._core.dpop})"

    async def _headers(self, method: str, url: str, tok: Token) -> dict[str, str]:
        if not self._core.dpop:
            return self._core.headers(method, url, tok)
        return await asyncio.to_thread(self._core.headers, method, url, tok)

    def _retry(self, request: httpx2.Request, response: httpx2.Response) -> str | None:
        return self._core.retry_reason(str(request.url), response.status_code,
                                       response.headers.get("WWW-Authenticate"),
                                       response.headers.get("DPoP-Nonce"))

    async def async_auth_flow(self, request: httpx2.Request
                              ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        url = str(request.url)
        tok = await self._core.token_async()
        request.headers.update(await self._headers(request.method, url, tok))
        response = yield request
        retry = self._retry(request, response)
        if retry is None:
            return
        if retry == "invalid_token":
            self._core.invalidate(tok)
            tok = await self._core.token_async()
        request.headers.update(await self._headers(request.method, url, tok))
        response = yield request
        self._core.remember_nonce(url, response.headers.get("DPoP-Nonce"))

    def sync_auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        url = str(request.url)
        tok = self._core.token()
        request.headers.update(self._core.headers(request.method, url, tok))
        response = yield request
        retry = self._retry(request, response)
        if retry is None:
            return
        if retry == "invalid_token":
            self._core.invalidate(tok)
            tok = self._core.token()
        request.headers.update(self._core.headers(request.method, url, tok))
        response = yield request
        self._core.remember_nonce(url, response.headers.get("DPoP-Nonce"))

    def close(self) -> None:
        self._core.close()


def mcp_http_client(tokens: TokenSource | AsyncTokenSource, *, resource: str,
                    scopes: Sequence[str] = (), agent: str | None = None, dpop: bool = False,
                    socket_path: str | os.PathLike[str] | None = None) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient`` with :class:`BadgeMCPAuth` for ``streamable_http_client(url,
    http_client=...)``; use it as a context manager. Timeouts as the SDK's own client (30 s,
    300 s to read: a server may hold a response stream open); redirects are the transport's
    business (it follows same-origin ones itself)."""
    return httpx2.AsyncClient(
        auth=BadgeMCPAuth(tokens, resource=resource, scopes=scopes, agent=agent, dpop=dpop,
                          socket_path=socket_path),
        timeout=httpx2.Timeout(MCP_TIMEOUT, read=MCP_READ_TIMEOUT))


# -- the server: a TokenVerifier, DPoP, and scopes per tool --------------------------------

# The DPoP proof and request of the HTTP request being authenticated (set by dpop_asgi).
_dpop_request: contextvars.ContextVar[DpopRequest | None] = contextvars.ContextVar(
    "badgeclient_mcp_dpop", default=None)


class BadgeTokenVerifier:
    """An ``mcp.server.auth.provider.TokenVerifier`` for badged access tokens.

    ``resource``: this server's URL, the audience a token must carry.
    ``jwks``: the daemon's JWK Set (``badgectl jwks``), or a function that
    returns it (read a file, ask the daemon): it is called again, at most
    every ``jwks_refresh`` seconds, when a token names a key the set does not
    have -- the daemon rotated a key -- and the token checked once more.
    Or ``verifier``: a configured :class:`~badgeclient.verify.Verifier`
    (roots, revocations, clock). ``issuer``: the daemon's ``iss`` if the JWKS
    does not say it. ``min_assurance``: refuse tokens below this level
    (``enterprise``, ``advanced``). ``require_dpop``: refuse tokens not bound
    to a key (needs :func:`dpop_asgi` around the app to see the proofs).

    A refusal is ``None`` to the SDK (a 401 for the client) and a log line
    with the stable reason, never the token.
    """

    def __init__(self, *, resource: str,
                 jwks: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
                 verifier: Verifier | None = None, issuer: str | None = None,
                 min_assurance: str | None = None, require_dpop: bool = False,
                 jwks_refresh: float = 30.0) -> None:
        if (jwks is None) == (verifier is None):
            raise ValueError("pass exactly one of jwks= or verifier=")
        self.resource = resource
        self._load = jwks if callable(jwks) else None
        self._min_assurance = min_assurance
        # DPoP proofs stay single-use across JWKS reloads: one replay cache.
        self._replay = ReplayCache()
        self._verifier = verifier or self._make(jwks() if callable(jwks) else jwks)
        self._issuer = issuer
        self._require_dpop = require_dpop
        self._jwks_refresh = jwks_refresh
        self._loaded_at = time.monotonic()
        #: Refusals by reason (for tests and metrics).
        self.refusals: dict[str, int] = {}
        #: Times the JWKS was loaded again for an unknown key.
        self.jwks_reloads = 0

    def _make(self, jwks: Mapping[str, Any] | None) -> Verifier:
        return Verifier(jwks=jwks, min_assurance=self._min_assurance, single_use_tokens=False,
                        replay_cache=self._replay)

    def _check(self, token: str) -> VerifiedToken:
        return self._verifier.verify_token(token, audience=self.resource, issuer=self._issuer,
                                           dpop=_dpop_request.get(), require_dpop=self._require_dpop)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            try:
                v = self._check(token)
            except VerificationError as exc:
                now = time.monotonic()
                if (exc.reason != "unknown_kid" or self._load is None
                        or now - self._loaded_at < self._jwks_refresh):
                    raise
                self._loaded_at = now  # at most one reload per interval, whatever it finds
                self._verifier = self._make(await asyncio.to_thread(self._load))
                self.jwks_reloads += 1
                v = self._check(token)
        except VerificationError as exc:
            self.refusals[exc.reason] = self.refusals.get(exc.reason, 0) + 1
            _logger.info("MCP token refused: %s", exc.reason)
            return None
        claims: dict[str, Any] = {"iss": v.issuer, "assurance": v.assurance, "agent": v.agent}
        if v.user is not None:
            claims["act"] = {"sub": v.agent}
        if v.dpop_jkt is not None:
            claims["cnf"] = {"jkt": v.dpop_jkt}
        # client_id: the agent; subject: the user it acts for, else the agent itself.
        return AccessToken(token=token, client_id=v.agent, scopes=list(v.scopes),
                           expires_at=v.expires_at, resource=self.resource,
                           subject=v.user or v.agent, claims=claims)


def dpop_asgi(app: ASGIApp, *, resource: str) -> ASGIApp:
    """Accept ``Authorization: DPoP <token>`` + ``DPoP: <proof>`` in front of an MCP app.

    The SDK's bearer backend only reads ``Bearer`` tokens; this wrapper hands
    it the token and leaves the proof (with the request's method and URI,
    ``htu`` = ``resource``'s origin + the request path) to
    :class:`BadgeTokenVerifier`, which checks it against the token's
    ``cnf.jkt``. A ``DPoP`` proof under a ``Bearer`` token is refused by the
    verifier (``token_not_bound``), so a proof cannot be dropped or added.
    """
    origin = resource.split("://", 1)[0] + "://" + resource.split("://", 1)[1].split("/", 1)[0]

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = list(scope.get("headers", []))
        auth = [v for k, v in headers if k == b"authorization"]
        proofs = [v for k, v in headers if k == b"dpop"]
        dpop: DpopRequest | None = None
        if len(proofs) > 1 or len(auth) > 1:
            headers = [(k, v) for k, v in headers if k not in (b"authorization", b"dpop")]
        elif proofs:
            dpop = DpopRequest(proof=proofs[0].decode("latin-1"), htm=scope["method"],
                               htu=origin + scope["path"])
            if auth and auth[0][:5].lower() == b"dpop ":
                headers = [(k, b"Bearer " + v[5:] if k == b"authorization" else v)
                           for k, v in headers]
        reset = _dpop_request.set(dpop)
        try:
            await app(dict(scope, headers=headers), receive, send)
        finally:
            _dpop_request.reset(reset)

    return wrapped


class ToolScopes:
    """Scopes each tool needs, checked on every ``tools/call`` (an ``MCPServer`` middleware).

    ``ToolScopes({"write_note": ["notes:write"]})`` or ``@scopes.require("notes:write")``
    above ``@server.tool()``. A call is refused unless the caller's token has
    every scope the tool needs; a tool not listed is refused too unless
    ``unlisted="allow"`` (a new tool must not be open by omission).
    ``tools/list`` omits the tools the caller cannot call.
    """

    def __init__(self, required: Mapping[str, Iterable[str]] | None = None, *,
                 unlisted: str = "deny") -> None:
        if unlisted not in ("deny", "allow"):
            raise ValueError("unlisted must be 'deny' or 'allow'")
        self._required = {name: frozenset(s) for name, s in (required or {}).items()}
        self._allow_unlisted = unlisted == "allow"

    def require(self, *scopes: str, name: str | None = None) -> Callable[[F], F]:
        """Decorator: the tool (named ``name`` or after the function) needs ``scopes``."""
        def mark(fn: F) -> F:
            key = name if name is not None else str(getattr(fn, "__name__", ""))
            self._required[key] = frozenset(scopes)
            return fn
        return mark

    def allowed(self, tool: str, scopes: Iterable[str]) -> bool:
        need = self._required.get(tool)
        if need is None:
            return self._allow_unlisted
        return need <= frozenset(scopes)

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method not in ("tools/call", "tools/list"):
            return await call_next(ctx)
        token = get_access_token()
        have = frozenset(token.scopes) if token is not None else frozenset()
        if ctx.method == "tools/call":
            name = ctx.params.get("name") if ctx.params else None
            if not isinstance(name, str) or not self.allowed(name, have):
                _logger.info("MCP tool call refused: %r needs scopes the token lacks", name)
                raise MCPError(code=INVALID_PARAMS,
                               message=f"insufficient_scope: tool {name!r} is not allowed for this token")
            return await call_next(ctx)
        result = await call_next(ctx)
        if isinstance(result, ListToolsResult):
            return result.model_copy(update={"tools": [t for t in result.tools
                                                       if self.allowed(t.name, have)]})
        if isinstance(result, dict) and isinstance(result.get("tools"), list):
            return dict(result, tools=[t for t in result["tools"] if isinstance(t, Mapping)
                                       and self.allowed(str(t.get("name")), have)])
        return result
