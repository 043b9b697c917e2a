"""What the HTTP auth adapters (httpx, requests) share: tokens, DPoP proofs, nonces, retry rules.

Kept free of any HTTP library so each adapter is only the glue its library
wants (an ``httpx.Auth`` generator, a ``requests`` response hook), and the
rules -- when to retry, which nonce to send, what never to log -- are one
piece of code tested through both.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from badgeclient.client import DEFAULT_SOCKET, Token
from badgeclient.credentials import CredentialClient
from badgeclient.errors import UnavailableError
from badgeclient.tokensource import AsyncTokenSource, TokenSource

MAX_NONCE_ORIGINS = 64
MAX_NONCE_BYTES = 512
_DEFAULT_PORTS = {"http": 80, "https": 443}


def challenge_error(www_authenticate: str) -> str:
    """The ``error`` parameter of a Bearer/DPoP ``WWW-Authenticate`` challenge, if any."""
    for part in www_authenticate.replace(",", " ").split():
        name, _, value = part.partition("=")
        if name.lower() == "error":
            return value.strip('"')
    return ""


def origin(url: str) -> str:
    """scheme://host:port, the default port made explicit (nonces are per origin)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname}:{p.port or _DEFAULT_PORTS.get(p.scheme, '')}"


def htu(url: str) -> str:
    """RFC 9449 §4.2: the request URI without query and fragment."""
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, p.path, "", ""))


class AuthCore:
    """One audience's credentials for HTTP requests, from a token source.

    ``Authorization: Bearer <token>``, or with ``dpop=True`` a token bound to
    the agent's key plus a fresh proof from the daemon per request (the proof
    covers method, URI, token and the origin's nonce, so it cannot be made
    ahead of the request).
    """

    def __init__(self, tokens: TokenSource | AsyncTokenSource, *, audience: str,
                 scopes: Sequence[str] = (), agent: str | None = None, dpop: bool = False,
                 socket_path: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> None:
        self.tokens = tokens
        self.audience = audience
        self.scopes = tuple(scopes)
        self.agent = agent
        self.dpop = dpop
        self._socket = socket_path or os.environ.get("BADGED_SOCKET") or DEFAULT_SOCKET
        self._timeout = timeout
        self._proofs: CredentialClient | None = None
        self._lock = threading.Lock()
        # origin -> the last DPoP-Nonce it sent (bounded: one per server talked to).
        self._nonces: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(audience={self.audience!r}, dpop={self.dpop})"

    # -- tokens ----------------------------------------------------------------------

    def token(self) -> Token:
        if not isinstance(self.tokens, TokenSource):
            raise TypeError("an AsyncTokenSource works with async HTTP clients only")
        return self.tokens.token(self.audience, self.scopes, agent=self.agent, dpop_bound=self.dpop)

    async def token_async(self) -> Token:
        if isinstance(self.tokens, AsyncTokenSource):
            return await self.tokens.token(self.audience, self.scopes, agent=self.agent,
                                           dpop_bound=self.dpop)
        return await asyncio.to_thread(self.token)

    def invalidate(self, tok: Token) -> None:
        self.tokens.invalidate(tok.token)

    # -- headers ---------------------------------------------------------------------

    def headers(self, method: str, url: str, tok: Token) -> dict[str, str]:
        """The headers for one request (a new DPoP proof each time)."""
        if not self.dpop:
            return {"Authorization": f"Bearer {tok.token}"}
        return {"Authorization": f"DPoP {tok.token}", "DPoP": self.proof(method, url, tok)}

    def proof(self, method: str, url: str, tok: Token) -> str:
        """A fresh proof for this method, URI, token and the origin's current nonce.

        The agent named is the token's, so the proof key is the key the token
        is bound to (``cnf.jkt``).
        """
        with self._lock:
            nonce = self._nonces.get(origin(url), "")
            if self._proofs is None:
                self._proofs = CredentialClient(self._socket, timeout=self._timeout)
            client = self._proofs
        try:
            return client.dpop_proof(htm=method, htu=htu(url), access_token=tok.token, nonce=nonce,
                                     agent=tok.agent or self.agent).proof
        except UnavailableError:
            with self._lock:  # reconnect on a fresh channel next time (daemon restarted)
                if self._proofs is client:
                    self._proofs = None
            client.close()
            raise

    # -- challenges ------------------------------------------------------------------

    def remember_nonce(self, url: str, nonce: str | None) -> str | None:
        """Keep the origin's ``DPoP-Nonce``; returns it if it is new."""
        if not self.dpop or not nonce or len(nonce) > MAX_NONCE_BYTES or not nonce.isascii():
            return None
        with self._lock:
            key = origin(url)
            changed = self._nonces.get(key) != nonce
            self._nonces[key] = nonce
            self._nonces.move_to_end(key)
            while len(self._nonces) > MAX_NONCE_ORIGINS:
                self._nonces.popitem(last=False)
        return nonce if changed else None

    def retry_reason(self, url: str, status: int, www_authenticate: str | None,
                     nonce: str | None) -> str | None:
        """Whether one retry can succeed: a new nonce was asked for, or the token was refused."""
        new_nonce = self.remember_nonce(url, nonce)
        if status not in (400, 401):
            return None
        error = challenge_error(www_authenticate or "")
        if error == "use_dpop_nonce" and new_nonce is not None:
            return "use_dpop_nonce"
        if status == 401 and error == "invalid_token":
            return "invalid_token"
        return None

    def close(self) -> None:
        with self._lock:
            client, self._proofs = self._proofs, None
        if client is not None:
            client.close()
