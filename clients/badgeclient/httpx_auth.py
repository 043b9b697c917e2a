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
import collections
import os
import threading
from collections.abc import AsyncGenerator, Generator, Sequence

import httpx

from badgeclient.client import DEFAULT_SOCKET, Token
from badgeclient.credentials import CredentialClient
from badgeclient.errors import UnavailableError
from badgeclient.tokensource import AsyncTokenSource, TokenSource

MAX_NONCE_ORIGINS = 64


def _challenge_error(response: httpx.Response) -> str:
    """The ``error`` parameter of a Bearer/DPoP ``WWW-Authenticate`` challenge, if any."""
    header = str(response.headers.get("WWW-Authenticate", ""))
    for part in header.replace(",", " ").split():
        name, _, value = part.partition("=")
        if name.lower() == "error":
            return value.strip('"')
    return ""


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.host}:{url.port or ''}"


def _htu(url: httpx.URL) -> str:
    """RFC 9449 §4.2: the request URI without query and fragment."""
    return str(url.copy_with(query=None, fragment=None))


class BadgeAuth(httpx.Auth):
    """``Authorization: Bearer`` (or ``DPoP`` + a ``DPoP`` proof header) from a token source."""

    # The request may be sent twice (challenge, retry): keep its body.
    requires_request_body = True

    def __init__(self, tokens: TokenSource | AsyncTokenSource, *, audience: str,
                 scopes: Sequence[str] = (), agent: str | None = None, dpop: bool = False,
                 socket_path: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> None:
        self._tokens = tokens
        self._audience = audience
        self._scopes = tuple(scopes)
        self._agent = agent
        self._dpop = dpop
        self._socket = socket_path or os.environ.get("BADGED_SOCKET") or DEFAULT_SOCKET
        self._timeout = timeout
        self._proofs: CredentialClient | None = None
        self._lock = threading.Lock()
        # origin -> the last DPoP-Nonce it sent (bounded: one per server talked to).
        self._nonces: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"BadgeAuth(audience={self._audience!r}, dpop={self._dpop})"

    # -- the flows -------------------------------------------------------------------

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not isinstance(self._tokens, TokenSource):
            raise TypeError("BadgeAuth with an AsyncTokenSource works with httpx.AsyncClient only")
        tok = self._sync_token()
        self._sign(request, tok, self._proof(request, tok) if self._dpop else None)
        response = yield request
        retry = self._retry_reason(request, response, tok)
        if retry is None:
            return
        if retry == "invalid_token":
            self._tokens.invalidate(tok.token)
            tok = self._sync_token()
        self._sign(request, tok, self._proof(request, tok) if self._dpop else None)
        response = yield request
        self._remember_nonce(request, response)

    async def async_auth_flow(self, request: httpx.Request
                              ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        tok = await self._async_token()
        proof = await asyncio.to_thread(self._proof, request, tok) if self._dpop else None
        self._sign(request, tok, proof)
        response = yield request
        retry = self._retry_reason(request, response, tok)
        if retry is None:
            return
        if retry == "invalid_token":
            self._tokens.invalidate(tok.token)
            tok = await self._async_token()
        proof = await asyncio.to_thread(self._proof, request, tok) if self._dpop else None
        self._sign(request, tok, proof)
        response = yield request
        self._remember_nonce(request, response)

    # -- pieces --------------------------------------------------------------------------

    def _sync_token(self) -> Token:
        assert isinstance(self._tokens, TokenSource)
        return self._tokens.token(self._audience, self._scopes, agent=self._agent,
                                  dpop_bound=self._dpop)

    async def _async_token(self) -> Token:
        if isinstance(self._tokens, AsyncTokenSource):
            return await self._tokens.token(self._audience, self._scopes, agent=self._agent,
                                            dpop_bound=self._dpop)
        return await asyncio.to_thread(self._sync_token)

    def _sign(self, request: httpx.Request, tok: Token, proof: str | None) -> None:
        if proof is None:
            request.headers["Authorization"] = f"Bearer {tok.token}"
        else:
            request.headers["Authorization"] = f"DPoP {tok.token}"
            request.headers["DPoP"] = proof

    def _proof(self, request: httpx.Request, tok: Token) -> str:
        """A fresh proof for this method, URI, token and the origin's current nonce.

        The agent named is the token's, so the proof key is the key the token
        is bound to (``cnf.jkt``).
        """
        with self._lock:
            nonce = self._nonces.get(_origin(request.url), "")
            if self._proofs is None:
                self._proofs = CredentialClient(self._socket, timeout=self._timeout)
            client = self._proofs
        try:
            return client.dpop_proof(htm=request.method, htu=_htu(request.url),
                                     access_token=tok.token, nonce=nonce,
                                     agent=tok.agent or self._agent).proof
        except UnavailableError:
            with self._lock:  # reconnect on a fresh channel next time (daemon restarted)
                if self._proofs is client:
                    self._proofs = None
            client.close()
            raise

    def _remember_nonce(self, request: httpx.Request, response: httpx.Response) -> str | None:
        nonce = response.headers.get("DPoP-Nonce")
        if not self._dpop or not nonce or len(nonce) > 512 or not nonce.isascii():
            return None
        with self._lock:
            origin = _origin(request.url)
            changed = self._nonces.get(origin) != nonce
            self._nonces[origin] = nonce
            self._nonces.move_to_end(origin)
            while len(self._nonces) > MAX_NONCE_ORIGINS:
                self._nonces.popitem(last=False)
        return nonce if changed else None

    def _retry_reason(self, request: httpx.Request, response: httpx.Response,
                      tok: Token) -> str | None:
        """Whether one retry can succeed: a new nonce was asked for, or the token was refused."""
        new_nonce = self._remember_nonce(request, response)
        if response.status_code not in (400, 401):
            return None
        error = _challenge_error(response)
        if error == "use_dpop_nonce" and new_nonce is not None:
            return "use_dpop_nonce"
        if response.status_code == 401 and error == "invalid_token":
            return "invalid_token"
        return None

    def close(self) -> None:
        with self._lock:
            client, self._proofs = self._proofs, None
        if client is not None:
            client.close()
