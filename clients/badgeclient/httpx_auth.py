"""``httpx`` authentication with badged credentials (``pip install badgeclient[httpx]``).

::

    import httpx
    from badgeclient import TokenSource
    from badgeclient.httpx_auth import BadgeAuth

    tokens = TokenSource()
    auth = BadgeAuth(tokens, audience="https://api.example.com", scopes=["read"])
    httpx.get("https://api.example.com/orders", auth=auth)

    # DPoP (RFC 9449): a token bound to the agent's hardware key, plus a fresh
    # proof from the daemon for every request.
    auth = BadgeAuth(tokens, audience="https://api.example.com", scopes=["read"], dpop=True)

The same object works with ``httpx.Client`` and ``httpx.AsyncClient``; with
an :class:`~badgeclient.tokensource.AsyncTokenSource` the async flow never
blocks the event loop (the sync daemon calls it still makes -- DPoP proofs --
run in a worker thread).

Challenges handled, each retried once per request: a ``DPoP-Nonce`` asked for
with ``error="use_dpop_nonce"`` (RFC 9449 §8/§9; the nonce is remembered per
origin and sent from then on), and ``error="invalid_token"`` on a 401 (the
token is dropped from the cache and a fresh one fetched -- e.g. after a key
rotation the server has not seen yet). Nothing here logs a token or a proof.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Generator, Sequence

import httpx

from badgeclient._authcore import AuthCore
from badgeclient.client import Token
from badgeclient.tokensource import AsyncTokenSource, TokenSource


class BadgeAuth(httpx.Auth):
    """``Authorization: Bearer`` (or ``DPoP`` + a ``DPoP`` proof header) from a token source."""

    # The request may be sent twice (challenge, retry): keep its body.
    requires_request_body = True

    def __init__(self, tokens: TokenSource | AsyncTokenSource, *, audience: str,
                 scopes: Sequence[str] = (), agent: str | None = None, dpop: bool = False,
                 socket_path: str | os.PathLike[str] | None = None, timeout: float = 10.0,
                 prefetch_proofs: bool = True) -> None:
        self._core = AuthCore(tokens, audience=audience, scopes=scopes, agent=agent, dpop=dpop,
                              socket_path=socket_path, timeout=timeout,
                              prefetch_proofs=prefetch_proofs)

    def __repr__(self) -> str:
        return f"BadgeAuth(audience={self._core.audience!r}, dpop={self._core.dpop})"

    # -- the flows -------------------------------------------------------------------

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not isinstance(self._core.tokens, TokenSource):
            raise TypeError("BadgeAuth with an AsyncTokenSource works with httpx.AsyncClient only")
        tok = self._core.token()
        request.headers.update(self._core.headers(request.method, str(request.url), tok))
        response = yield request
        retry = self._retry_reason(request, response)
        if retry is None:
            return
        if retry == "invalid_token":
            self._core.invalidate(tok)
            tok = self._core.token()
        request.headers.update(self._core.headers(request.method, str(request.url), tok))
        response = yield request
        self._core.remember_nonce(str(request.url), response.headers.get("DPoP-Nonce"))

    async def async_auth_flow(self, request: httpx.Request
                              ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        tok = await self._core.token_async()
        url = str(request.url)
        request.headers.update(await self._headers_async(request.method, url, tok))
        response = yield request
        retry = self._retry_reason(request, response)
        if retry is None:
            return
        if retry == "invalid_token":
            self._core.invalidate(tok)
            tok = await self._core.token_async()
        request.headers.update(await self._headers_async(request.method, url, tok))
        response = yield request
        self._core.remember_nonce(url, response.headers.get("DPoP-Nonce"))

    async def _headers_async(self, method: str, url: str, tok: Token) -> dict[str, str]:
        if not self._core.dpop:
            return self._core.headers(method, url, tok)
        # A proof is a daemon round trip: never on the event loop.
        return await asyncio.to_thread(self._core.headers, method, url, tok)

    def _retry_reason(self, request: httpx.Request, response: httpx.Response) -> str | None:
        return self._core.retry_reason(str(request.url), response.status_code,
                                       response.headers.get("WWW-Authenticate"),
                                       response.headers.get("DPoP-Nonce"))

    def close(self) -> None:
        self._core.close()
