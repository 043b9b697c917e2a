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
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

from badgeclient.client import DEFAULT_SOCKET, Token
from badgeclient.credentials import CredentialClient
from badgeclient.errors import UnavailableError
from badgeclient.tokensource import AsyncTokenSource, TokenSource

MAX_NONCE_ORIGINS = 64
#: A spare proof older than this is not used (it would reach the server with an old iat).
SPARE_MAX_AGE = 2.0
#: Endpoints (method/URI/token/nonce/agent) with spares kept.
MAX_SPARES = 8
#: Proofs kept made or in the making per endpoint: a call waits for the daemon
#: only when calls come faster than this many proofs can be made.
SPARE_DEPTH = 2
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
                 socket_path: str | os.PathLike[str] | None = None, timeout: float = 10.0,
                 prefetch_proofs: bool = True) -> None:
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
        # Proof prefetch: (method, htu, token, nonce, agent) -> (proof, made at, monotonic).
        self._prefetch = prefetch_proofs
        self._spares: collections.OrderedDict[
            tuple[str, ...], collections.deque[tuple[Future[str], float]]] = collections.OrderedDict()
        self._last_use: dict[tuple[str, ...], float] = {}
        self._pool: ThreadPoolExecutor | None = None
        #: Proofs served from a prefetched spare (for tests and the benchmark).
        self.spares_used = 0

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

        Prefetch: when the same method, URI (without query), token and nonce
        were used less than ``SPARE_MAX_AGE`` seconds ago, the next proofs for
        them (``SPARE_DEPTH``) are requested in the background right away, so
        a run of calls to one endpoint waits for the daemon less (or not at
        all). A spare is used at most once and only while younger than
        ``SPARE_MAX_AGE`` (its ``iat`` stays fresh); spares left unused when
        the calls stop or the nonce changes are dropped -- proofs the daemon
        issued and audited that no server sees.
        """
        with self._lock:
            nonce = self._nonces.get(origin(url), "")
        key = (method, htu(url), tok.token, nonce, tok.agent or self.agent or "")
        if not self._prefetch:
            return self._fetch_proof(key)
        now = time.monotonic()
        with self._lock:
            queue = self._spares.get(key)
            spare = queue.popleft() if queue else None
            recent = now - self._last_use.get(key, -SPARE_MAX_AGE) < SPARE_MAX_AGE
            self._last_use[key] = now
            if len(self._last_use) > 4 * MAX_SPARES:
                self._last_use = {key: now}
        if recent or spare is not None:
            self._top_up(key)
        if spare is not None and now - spare[1] < SPARE_MAX_AGE:
            try:
                proof = spare[0].result(timeout=self._timeout)
            except Exception:  # a failed prefetch is a miss, never the caller's error
                return self._fetch_proof(key)
            self.spares_used += 1
            return proof
        return self._fetch_proof(key)

    def _fetch_proof(self, key: tuple[str, ...]) -> str:
        method, target, token, nonce, agent = key
        with self._lock:
            if self._proofs is None:
                self._proofs = CredentialClient(self._socket, timeout=self._timeout)
            client = self._proofs
        try:
            return client.dpop_proof(htm=method, htu=target, access_token=token, nonce=nonce,
                                     agent=agent or None).proof
        except UnavailableError:
            with self._lock:  # reconnect on a fresh channel next time (daemon restarted)
                if self._proofs is client:
                    self._proofs = None
            client.close()
            raise

    def _top_up(self, key: tuple[str, ...]) -> None:
        """Keep ``SPARE_DEPTH`` proofs for ``key`` made or in the making."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=SPARE_DEPTH,
                                                thread_name_prefix="badge-dpop")
            queue = self._spares.setdefault(key, collections.deque())
            self._spares.move_to_end(key)
            while len(self._spares) > MAX_SPARES:
                self._spares.popitem(last=False)
            while len(queue) < SPARE_DEPTH:
                queue.append((self._pool.submit(self._fetch_proof, key), time.monotonic()))

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
            pool, self._pool = self._pool, None
            self._spares.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            client, self._proofs = self._proofs, None
        if client is not None:
            client.close()
