"""OAuth access tokens for an agent, obtained with badged credentials (``badgeclient[httpx]``).

An API behind an OAuth authorization server (AS) wants the AS's access token,
not badged's. The agent gets one without any secret on disk:

* **client credentials** (RFC 6749 §4.4) with ``private_key_jwt`` client
  authentication (RFC 7523): the client assertion is signed by the agent's
  hardware-held key, fresh for every request to the AS;
* **token exchange** (RFC 8693) carrying a *delegation*: the subject token is
  a badged token with ``sub`` = the user and ``act.sub`` = the agent
  (``badgectl delegate`` / ``WorkloadClient.delegate``), and the client
  authenticates with the same kind of assertion, so the AS can check that the
  actor presenting the delegation is the agent it names.

::

    from badgeclient.oauth import OAuthClient

    oauth = OAuthClient("https://as.example.com/token")
    tok = oauth.client_credentials(scopes=["orders:read"], resource="https://api.example.com")
    httpx.get("https://api.example.com/orders", auth=oauth.auth(scopes=["orders:read"],
                                                                resource="https://api.example.com"))

    # Acting for a user who delegated to this agent:
    tok = oauth.token_exchange(delegation="d-…", scopes=["orders:read"],
                               resource="https://api.example.com")

Tokens are cached per (grant, scopes, resource, audience, delegation) like
:class:`~badgeclient.TokenSource` does: returned until the refresh point (80 %
of the lifetime or 30 s before expiry, whichever first); past it one caller
refreshes while the others keep the cached token, and a failed refresh (the
AS is away) keeps serving the cached token, with backoff, until it expires.
Timing is on the monotonic clock. The AS must be ``https`` (``http`` only on
loopback, for tests): assertions and tokens are never sent in clear text.
Nothing here logs a token or an assertion.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import NamedTuple, Self
from urllib.parse import urlsplit

import httpx

from badgeclient._authcore import challenge_error
from badgeclient.client import DEFAULT_SOCKET, WorkloadClient
from badgeclient.credentials import CredentialClient
from badgeclient.errors import UnavailableError

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 -- a URN
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
#: Lifetime assumed when the AS sends no ``expires_in`` (RFC 6749 makes it optional).
DEFAULT_LIFETIME = 60.0
MAX_RESPONSE_BYTES = 64 * 1024
REFRESH_FRACTION = 0.8
REFRESH_MARGIN = 30.0
EXPIRY_LEEWAY = 1.0
BACKOFF_INITIAL = 0.25
BACKOFF_MAX = 30.0
MAX_ENTRIES = 64


class OAuthError(Exception):
    """The AS refused (``error`` is its RFC 6749 §5.2 code) or could not be reached (``error``
    is ``unreachable``). The message carries the AS's description, never a credential."""

    def __init__(self, error: str, description: str = "", *, status: int = 0) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True)
class AccessToken:
    """An access token from the AS. ``repr`` never shows the token."""

    access_token: str
    token_type: str
    scopes: tuple[str, ...]
    expires_in: float
    issued_token_type: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"AccessToken(token_type={self.token_type!r}, scopes={self.scopes!r}, "
                f"expires_in={self.expires_in!r}, <{len(self.access_token)} chars>)")


class _Key(NamedTuple):
    grant: str
    scopes: tuple[str, ...]
    resource: str
    audience: str
    delegation: str


class _Entry:
    __slots__ = ("expires", "failures", "lock", "refresh", "retry", "token")

    def __init__(self) -> None:
        self.token: AccessToken | None = None
        self.refresh = 0.0
        self.expires = 0.0
        self.retry = 0.0
        self.failures = 0
        self.lock = threading.Lock()


def _check_endpoint(url: str) -> None:
    p = urlsplit(url)
    if p.scheme == "https" and p.hostname:
        return
    if p.scheme == "http" and p.hostname:
        try:
            if p.hostname == "localhost" or ipaddress.ip_address(p.hostname).is_loopback:
                return
        except ValueError:
            pass
    raise ValueError("the token endpoint must be https (http only on loopback)")


class OAuthClient:
    """Access tokens from one authorization server's token endpoint, cached.

    ``token_endpoint``: the AS's token URL. ``assertion_audience``: the
    ``aud`` of the client assertions (default: the token endpoint, which
    RFC 7523 §3 allows and most servers accept; some want their issuer URL).
    ``client_id``: sent as ``client_id`` and used as the assertion's
    ``iss``/``sub`` (default: the agent's SPIFFE ID). ``agent``: which of the
    caller's agents (default: the one the daemon matches). ``http``: an
    ``httpx.Client`` for the AS (default: a private one, closed by
    :meth:`close`).
    """

    def __init__(self, token_endpoint: str, *, assertion_audience: str | None = None,
                 client_id: str = "", agent: str | None = None,
                 socket_path: str | os.PathLike[str] | None = None, timeout: float = 10.0,
                 http: httpx.Client | None = None, monotonic: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_ENTRIES) -> None:
        _check_endpoint(token_endpoint)
        self.token_endpoint = token_endpoint
        self._assertion_aud = assertion_audience or token_endpoint
        self._client_id = client_id
        self._agent = agent
        self._socket = socket_path or os.environ.get("BADGED_SOCKET") or DEFAULT_SOCKET
        self._timeout = timeout
        self._http = http or httpx.Client(timeout=timeout, follow_redirects=False)
        self._own_http = http is None
        self._mono = monotonic
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[_Key, _Entry] = collections.OrderedDict()
        self._creds: CredentialClient | None = None
        self._workload: WorkloadClient | None = None
        self._rng = random.Random()
        #: Requests sent to the AS (for tests and metrics).
        self.requests = 0

    def __repr__(self) -> str:
        return f"OAuthClient({self.token_endpoint!r})"

    # -- public ----------------------------------------------------------------------

    def client_credentials(self, *, scopes: Sequence[str] = (), resource: str = "",
                           audience: str = "") -> AccessToken:
        """An access token for the agent itself (client credentials + RFC 7523 assertion)."""
        key = _Key("client_credentials", tuple(sorted(set(scopes))), resource, audience, "")
        return self._get(key, lambda: self._request({"grant_type": "client_credentials"}, key))

    def token_exchange(self, *, delegation: str, scopes: Sequence[str] = (), resource: str = "",
                       audience: str = "", subject_audience: str | None = None) -> AccessToken:
        """An access token for the *user* who delegated to this agent (RFC 8693).

        The subject token is a badged token minted for ``subject_audience``
        (default: the assertion audience, i.e. the AS) under ``delegation``:
        ``sub`` = the user, ``act.sub`` = the agent, scopes within both the
        delegation and the agent's policy. The AS sees who acts for whom.
        """
        if not delegation:
            raise ValueError("token_exchange needs a delegation id")
        key = _Key("token_exchange", tuple(sorted(set(scopes))), resource, audience, delegation)

        def fetch() -> AccessToken:
            subject = self._subject_token(delegation, key.scopes,
                                          subject_audience or self._assertion_aud)
            return self._request({"grant_type": TOKEN_EXCHANGE, "subject_token": subject,
                                  "subject_token_type": JWT_TOKEN_TYPE,
                                  "requested_token_type": ACCESS_TOKEN_TYPE}, key)
        return self._get(key, fetch)

    def invalidate(self, access_token: str) -> None:
        """Forget a token the resource server refused (the next call fetches anew)."""
        with self._lock:
            for k, e in list(self._entries.items()):
                if e.token is not None and e.token.access_token == access_token:
                    del self._entries[k]

    def auth(self, *, scopes: Sequence[str] = (), resource: str = "", audience: str = "",
             delegation: str | None = None) -> OAuthBearerAuth:
        """An ``httpx.Auth`` sending this AS's token as ``Bearer`` (token exchange if ``delegation``)."""
        return OAuthBearerAuth(self, scopes=scopes, resource=resource, audience=audience,
                               delegation=delegation)

    def close(self) -> None:
        with self._lock:
            creds, self._creds = self._creds, None
            workload, self._workload = self._workload, None
        for c in (creds, workload):
            if c is not None:
                c.close()
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- cache -----------------------------------------------------------------------

    def _entry(self, key: _Key) -> _Entry:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                e = self._entries[key] = _Entry()
                while len(self._entries) > self._max:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
            return e

    def _get(self, key: _Key, fetch: Callable[[], AccessToken]) -> AccessToken:
        e = self._entry(key)
        now = self._mono()
        tok = e.token
        if tok is not None and now < e.refresh:
            return tok
        if tok is not None and now < e.expires - EXPIRY_LEEWAY:
            # Past the refresh point, still valid: one caller refreshes, the
            # others (and a failed refresh) keep the cached token.
            if now < e.retry or not e.lock.acquire(blocking=False):
                return tok
            try:
                return self._fetch_into(e, fetch)
            except (OAuthError, UnavailableError):
                return tok
            finally:
                e.lock.release()
        with e.lock:
            if e.token is not None and self._mono() < e.refresh:
                return e.token  # another caller fetched it while we waited
            return self._fetch_into(e, fetch)

    def _fetch_into(self, e: _Entry, fetch: Callable[[], AccessToken]) -> AccessToken:
        start = self._mono()
        try:
            tok = fetch()
        except (OAuthError, UnavailableError):
            e.failures += 1
            delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** min(e.failures - 1, 30))
            e.retry = self._mono() + delay * (0.5 + 0.5 * self._rng.random())
            raise
        life = tok.expires_in
        margin = min(max((1 - REFRESH_FRACTION) * life, REFRESH_MARGIN), 0.5 * life)
        # Timed from before the request: the AS's clock started no later.
        e.token, e.refresh, e.expires = tok, start + life - margin, start + life
        e.failures, e.retry = 0, 0.0
        return tok

    # -- the daemon ------------------------------------------------------------------

    def _assertion(self) -> str:
        with self._lock:
            if self._creds is None:
                self._creds = CredentialClient(self._socket, timeout=self._timeout)
            creds = self._creds
        try:
            return creds.client_assertion(audience=self._assertion_aud, client_id=self._client_id,
                                          agent=self._agent).assertion
        except UnavailableError:
            with self._lock:
                if self._creds is creds:
                    self._creds = None
            creds.close()
            raise

    def _subject_token(self, delegation: str, scopes: Sequence[str], audience: str) -> str:
        with self._lock:
            if self._workload is None:
                self._workload = WorkloadClient(self._socket, timeout=self._timeout)
            w = self._workload
        try:
            return w.fetch_token(audience=audience, scopes=scopes, agent=self._agent,
                                 delegation=delegation).token
        except UnavailableError:
            with self._lock:
                if self._workload is w:
                    self._workload = None
            w.close()
            raise

    # -- the AS ----------------------------------------------------------------------

    def _request(self, form: dict[str, str], key: _Key) -> AccessToken:
        form = dict(form, client_assertion_type=CLIENT_ASSERTION_TYPE,
                    client_assertion=self._assertion())
        if self._client_id:
            form["client_id"] = self._client_id
        if key.scopes:
            form["scope"] = " ".join(key.scopes)
        if key.resource:
            form["resource"] = key.resource
        if key.audience:
            form["audience"] = key.audience
        self.requests += 1
        try:
            with self._http.stream("POST", self.token_endpoint, data=form,
                                   headers={"Accept": "application/json"}) as r:
                body = b""
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise OAuthError("invalid_response", "token response too large",
                                         status=r.status_code)
                status = r.status_code
        except httpx.HTTPError as exc:
            raise OAuthError("unreachable", type(exc).__name__) from None
        return _parse_response(status, body, key.scopes)


def _parse_response(status: int, body: bytes, requested: tuple[str, ...]) -> AccessToken:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise OAuthError("invalid_response", f"HTTP {status}, not a JSON object", status=status)
    if status != 200:
        error = doc.get("error")
        desc = doc.get("error_description")
        raise OAuthError(error if isinstance(error, str) else "invalid_response",
                         desc[:300] if isinstance(desc, str) else "", status=status)
    token, token_type = doc.get("access_token"), doc.get("token_type")
    if not isinstance(token, str) or not token or not isinstance(token_type, str):
        raise OAuthError("invalid_response", "no access_token/token_type", status=status)
    expires_in = doc.get("expires_in", DEFAULT_LIFETIME)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise OAuthError("invalid_response", "bad expires_in", status=status)
    scope = doc.get("scope")
    # RFC 6749 §5.1: scope is omitted when it is what was asked for.
    scopes = tuple(scope.split()) if isinstance(scope, str) else requested
    issued = doc.get("issued_token_type")
    extra = {k: v for k, v in doc.items() if k not in
             ("access_token", "token_type", "expires_in", "scope", "issued_token_type")}
    return AccessToken(token, token_type, scopes, float(expires_in),
                       issued if isinstance(issued, str) else "", extra)


class OAuthBearerAuth(httpx.Auth):
    """``Authorization: Bearer`` with the AS's token; a 401 ``invalid_token`` is retried once
    with a fresh one. For ``httpx.Client`` and ``httpx.AsyncClient`` (the AS call runs in a
    worker thread there)."""

    requires_request_body = True

    def __init__(self, oauth: OAuthClient, *, scopes: Sequence[str] = (), resource: str = "",
                 audience: str = "", delegation: str | None = None) -> None:
        self._oauth = oauth
        self._scopes = tuple(scopes)
        self._resource = resource
        self._audience = audience
        self._delegation = delegation

    def __repr__(self) -> str:
        return f"OAuthBearerAuth({self._oauth.token_endpoint!r}, scopes={self._scopes!r})"

    def token(self) -> AccessToken:
        if self._delegation:
            return self._oauth.token_exchange(delegation=self._delegation, scopes=self._scopes,
                                              resource=self._resource, audience=self._audience)
        return self._oauth.client_credentials(scopes=self._scopes, resource=self._resource,
                                              audience=self._audience)

    @staticmethod
    def _refused(response: httpx.Response) -> bool:
        return response.status_code == 401 and challenge_error(
            response.headers.get("WWW-Authenticate", "")) == "invalid_token"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        tok = self.token()
        request.headers["Authorization"] = f"Bearer {tok.access_token}"
        response = yield request
        if self._refused(response):
            self._oauth.invalidate(tok.access_token)
            request.headers["Authorization"] = f"Bearer {self.token().access_token}"
            yield request

    async def async_auth_flow(self, request: httpx.Request
                              ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        tok = await asyncio.to_thread(self.token)
        request.headers["Authorization"] = f"Bearer {tok.access_token}"
        response = yield request
        if self._refused(response):
            self._oauth.invalidate(tok.access_token)
            fresh = await asyncio.to_thread(self.token)
            request.headers["Authorization"] = f"Bearer {fresh.access_token}"
            yield request
