"""The credential proxy: agents send HTTP calls here, badged authorizes each one,
attaches the route's credential and forwards it to the HTTPS upstream.

The agent never holds the credential (docs/proxy.md). Per call:

1. **Caller.** The connection's kernel peer credentials and executable
   snapshot are read at accept (:func:`~badged.listener.peers.read_peer`,
   as on the workload socket) and every request attests the process again
   (:meth:`~badged.attest.process.ProcessAttestor.attest`, which refuses a
   process that exec'd since). Connections per uid are capped.
2. **Target.** The route is the ``Host`` header (``http://ROUTE/path`` over
   the Unix socket). The request target is normalized once
   (:mod:`badged.proxy.paths`); the result is what the policy matches, what
   the audit records and what the upstream receives -- never the agent's bytes.
   Conflicting or duplicate ``Content-Length``/``Transfer-Encoding`` are refused
   (aiohttp's parser refuses most; the handler checks again).
3. **Decision.** One :class:`~badged.service.issuance.Issuance` run of kind
   ``proxy`` (route, method, normalized path): the policy gate with the
   bundle's rate budget and approval, the agent's own key, a durable
   ``proxy.allowed`` record; the mint function makes the credential (a
   cached access token, a fresh DPoP proof per call) -- the same pipeline
   as every other credential. A route's own ``rate`` is spent only by
   allowed calls. Denials are HTTP 403 (429 for an exhausted budget) with a
   JSON reason, audited.
4. **Forward.** Hop-by-hop headers and anything the agent sent as
   ``Authorization``, ``DPoP``, ``Badged-Agent`` or the route's secret header
   are dropped; the credential is attached; the body (at most the route's
   ``max_request_bytes``, read only after the decision) is sent. Redirects
   are returned to the agent, never followed. TLS is verified against the
   system trust store or the route's ``ca_file``.
5. **Record.** ``proxy.completed``: agent, process, route, method, normalized
   path, status, bytes both ways, latency. Never a body, header value or
   credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import ClientError, ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from badged.attest.process import ProcessAttributes
from badged.core import assertions, dpop
from badged.core import context as request_context
from badged.core.jose import (
    b64url,
    canonical_json,
    ec_public_jwk,
    encode_jws_raw,
    encode_jws_with_header,
)
from badged.core.tokens import build_claims, mint_token
from badged.errors import (
    AttestationError,
    AuditError,
    BadgedError,
    InvalidRequestError,
    KeyStoreError,
    NotFoundError,
    PolicyDeniedError,
    RateLimitedError,
)
from badged.identity.registry import SigningKey
from badged.listener.front import READ_SIZE
from badged.listener.peers import PeerCredentials, read_peer
from badged.listener.sockets import bind_unix
from badged.policy.model import Bundle, Request, Route
from badged.policy.ratelimit import RateLimiter
from badged.proxy.paths import PathError, Target, normalize
from badged.service import validate
from badged.service.deps import ServiceDeps
from badged.service.issuance import Authorized, Caller, Issuance, Minted

_logger = logging.getLogger(__name__)
# aiohttp's access log would print paths and query strings: off (the audit
# record is the access log, with the normalized path and no query).
_quiet = logging.getLogger("badged.proxy.access")
_quiet.disabled = True
CHANNEL = "proxy"
AGENT_HEADER = "Badged-Agent"
# What the agent says it is working on (issue 21; badged.core.context).
CONTEXT_HEADER = "Badged-Context"
# RFC 9110 §7.6.1 hop-by-hop fields, plus the proxy's own and the ones the
# client library recomputes (Host, Content-Length).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                        "host", "content-length", "expect"})
# Never forwarded from the agent: credentials are the proxy's to attach, and
# headers some servers and frameworks honour as the *real* method or path
# (they would turn an allowed GET /public into DELETE /admin upstream).
_AGENT_CREDENTIAL_HEADERS = frozenset({
    "authorization", "dpop", AGENT_HEADER.lower(), CONTEXT_HEADER.lower(),
    "x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
    "x-rewrite-url", "x-original-uri", "x-forwarded-prefix"})
# Renew a cached access token when less than this share of its life is left.
_RENEW_AT = 0.25
_TOKEN_CACHE_MAX = 4096
_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_MAX_TOKEN_RESPONSE = 64 * 1024
_TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,16384}$")
# An upstream answer with a Content-Length up to this is read whole and sent
# to the agent in one write (one Response); larger or unsized ones stream.
_WHOLE_BODY_MAX = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})


def _oauth_key(route: Route, agent: str, client_id: str) -> tuple[Route, str, str]:
    """Keyed by the whole route: a policy reload that changes its token endpoint
    or scopes never reuses a token obtained for the old definition."""
    return (route, agent, client_id)


class CallTracker(Protocol):
    """The front's count of calls in flight (badged.listener.front.GrpcFront).

    Proxy calls are counted there too: the audit log fsyncs a lone call's
    record on the event loop thread, which is right only when no other call
    -- gRPC or proxied -- is in flight (measured: without this, 16 proxy
    clients ran no faster than one).
    """

    def call_started(self) -> None: ...

    def call_done(self, _task: object) -> None: ...


class SecretSource(Protocol):
    """Where static secrets come from (:class:`badged.proxy.secretstore.SecretStore`)."""

    def reveal(self, name: str) -> bytes:
        """The secret's value, decrypted now; NotFoundError if there is none."""
        ...


@dataclass(frozen=True, slots=True)
class _Credential:
    """What the mint function hands the forwarder: headers to set, and audit fields."""

    headers: tuple[tuple[str, str], ...]
    # credential "oauth" without a cached access token: the client assertion
    # the pipeline minted, to present at the token endpoint, and the cache key.
    assertion: str = ""
    client_id: str = ""


class _Handler(RequestHandler):
    """aiohttp's per-connection protocol, plus the caller read at accept."""

    peer: PeerCredentials | None = None
    owner: ProxyServer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # asyncio's default read size (256 KiB) costs an mmap/munmap per read;
        # the workload front reads READ_SIZE for the same reason (front.py).
        transport.max_size = READ_SIZE  # type: ignore[attr-defined]
        owner = self.owner
        assert owner is not None
        try:
            peer = read_peer(transport.get_extra_info("socket"), CHANNEL)
        except OSError:
            transport.close()
            return
        if owner.per_uid.get(peer.uid, 0) >= owner.max_per_uid:
            _logger.warning("proxy: connection limit for uid reached",
                            extra={"uid": peer.uid, "limit": owner.max_per_uid})
            _close_pidfd(peer)
            transport.close()
            return
        owner.per_uid[peer.uid] = owner.per_uid.get(peer.uid, 0) + 1
        self.peer = peer

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        peer, self.peer = self.peer, None
        owner = self.owner
        if peer is not None and owner is not None:
            left = owner.per_uid.get(peer.uid, 1) - 1
            if left:
                owner.per_uid[peer.uid] = left
            else:
                owner.per_uid.pop(peer.uid, None)
            _close_pidfd(peer)


def _close_pidfd(peer: PeerCredentials) -> None:
    if peer.pidfd >= 0:
        with contextlib.suppress(OSError):
            os.close(peer.pidfd)


class _Denied(Exception):
    """A refusal the handler answers with ``status`` and a JSON ``reason``."""

    def __init__(self, status: int, reason: str, *, detail: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail or reason
        self.retry_after = retry_after


def _json_response(status: int, error: str, reason: str,
                   retry_after: float | None = None) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    return web.Response(status=status, headers=headers, content_type="application/json",
                        text=json.dumps({"error": error, "reason": reason}))


class ProxyServer:
    """Owns the proxy socket, the upstream connection pools and the token cache."""

    def __init__(self, deps: ServiceDeps, path: Path, *, max_per_uid: int,
                 idle_timeout: float, secrets: SecretSource | None = None,
                 ssl_context: Callable[[str | None], ssl.SSLContext] | None = None,
                 calls: CallTracker | None = None) -> None:
        self.deps = deps
        self.path = path
        self.max_per_uid = max_per_uid
        self.idle_timeout = idle_timeout
        self.secrets = secrets
        self.calls = calls
        self.issuance = Issuance(deps)
        self.per_uid: dict[int, int] = {}
        self.route_limiter = RateLimiter()
        self._ssl_context = ssl_context or _ssl_context
        self._sessions: dict[str | None, ClientSession] = {}
        # Keyed by the whole (frozen) route: a reload that changes its audience
        # or scopes never reuses a token minted for the old definition.
        self._tokens: dict[tuple[str, Route, str, str], tuple[str, float, str, str]] = {}
        self._oauth: dict[tuple[Route, str, str], tuple[str, float]] = {}
        # Per route (frozen: a reload makes new keys): its upstream split once.
        self._upstreams: dict[Route, _Upstream] = {}
        # Per DPoP key (by thumbprint): the proof's JWS header, encoded once.
        self._proof_headers: dict[str, str] = {}
        self._server: asyncio.AbstractServer | None = None
        self._web: web.Server | None = None
        self._records: set[asyncio.Task[None]] = set()
        # The audit log's unawaited append (badged.audit.log.AuditLog.append_later).
        self._append_later: Callable[[Mapping[str, Any]], None] | None = getattr(
            deps.audit, "append_later", None)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        sock = bind_unix(self.path, mode=0o666, group=None)
        loop = asyncio.get_running_loop()
        self._web = web.Server(self._handle, handler_cancellation=True)
        server = self._web
        owner = self

        def factory() -> RequestHandler:
            handler = _Handler(server, loop=loop, keepalive_timeout=self.idle_timeout,
                               max_line_size=8190, max_field_size=8190, max_headers=100,
                               auto_decompress=False, access_log=_quiet)
            handler.owner = owner
            return handler

        self._server = await loop.create_unix_server(factory, sock=sock)
        _logger.info("proxy socket ready", extra={"socket": str(self.path)})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            if self._web is not None:
                await self._web.shutdown(2.0)
            with contextlib.suppress(OSError):
                self.path.unlink()
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        if self._records:  # completion records still on their way to the log
            await asyncio.gather(*self._records, return_exceptions=True)

    def _session(self, ca_file: str | None) -> ClientSession:
        session = self._sessions.get(ca_file)
        if session is None or session.closed:
            connector = TCPConnector(ssl=self._ssl_context(ca_file), limit=256,
                                     limit_per_host=64, enable_cleanup_closed=True)
            session = ClientSession(connector=connector, auto_decompress=False,
                                    cookie_jar=DummyCookieJar(), trust_env=False,
                                    skip_auto_headers=("User-Agent", "Accept",
                                                       "Accept-Encoding", "Content-Type"))
            self._sessions[ca_file] = session
        return session

    # -- one call ----------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        calls = self.calls
        if calls is None:
            return await self._call(request)
        calls.call_started()
        try:
            return await self._call(request)
        finally:
            calls.call_done(None)

    async def _call(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        handler = request.protocol
        peer = handler.peer if isinstance(handler, _Handler) else None
        if peer is None:
            return _json_response(403, "denied", "no caller identity")
        d = self.deps
        proc: ProcessAttributes | None = None
        route: Route | None = None
        target: Target | None = None
        agent: str | None = None
        try:
            try:
                proc = d.attestor.attest(peer)
            except AttestationError as exc:  # exec after connect, caller gone: on record
                raise _Denied(403, exc.public or "caller attestation failed",
                              detail=exc.detail) from None
            route = self._route(request)
            target = _target(request)
            _check_framing(request.headers, route)
            agent = validate.agent_name(request.headers.get(AGENT_HEADER, ""))
            caller = Caller(peer, proc)
            return await self._forward(request, caller, route, target, agent, started)
        except _Denied as exc:
            await self._audit_denied(proc, peer, route, request.method, target, agent, exc)
            error = {403: "denied", 429: "denied", 413: "too large",
                     503: "unavailable"}.get(exc.status, "bad request")
            return _json_response(exc.status, error, exc.reason, exc.retry_after)
        except RateLimitedError as exc:  # the gate audited it
            return _json_response(429, "denied", exc.public or "rate budget exhausted",
                                  exc.retry_after)
        except PolicyDeniedError as exc:  # the gate audited it
            return _json_response(403, "denied", exc.public or "denied by policy")
        except InvalidRequestError as exc:
            return _json_response(400, "bad request", exc.public or "invalid request")
        except (AuditError, KeyStoreError) as exc:  # nothing unaudited, nothing unsigned
            _logger.error("proxy: call refused, daemon not able to serve",
                          extra={"error": str(exc)})
            return _json_response(503, "unavailable", exc.caller_message)
        except BadgedError as exc:
            _logger.info("proxy: refused", extra={"error": str(exc)})
            return _json_response(403, "denied", exc.public or "refused")
        except (web.HTTPException, asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # never kill the loop for one call; never echo the detail
            _logger.exception("proxy: call failed", extra={"uid": peer.uid, "pid": peer.pid})
            return _json_response(500, "internal", "internal error")

    def _route(self, request: web.BaseRequest) -> Route:
        host = request.headers.getall("Host", [])
        if len(host) != 1:
            raise _Denied(400, "exactly one Host header naming the route is required")
        name = host[0].strip().lower()
        if name.endswith(":80"):
            name = name[:-3]
        route = self.deps.policy.current.routes.get(name)
        if route is None:
            raise _Denied(403, "no such route", detail=f"no route {name[:64]!r}")
        return route

    def _upstream(self, route: Route) -> _Upstream:
        """The route's upstream, split once per route definition."""
        base = self._upstreams.get(route)
        if base is None:
            if len(self._upstreams) >= _TOKEN_CACHE_MAX:
                self._upstreams.clear()
            base = self._upstreams[route] = _split_upstream(route)
        return base

    async def _forward(self, request: web.BaseRequest, caller: Caller, route: Route,
                       target: Target, agent: str | None, started: float) -> web.StreamResponse:
        d = self.deps
        base = self._upstream(route)
        path = base.path + target.encoded_path()
        url = base.origin + path
        method = request.method
        req = Request(kind="proxy", agent=agent, audience=base.origin, scopes=(),
                      proxy_route=route.name, proxy_method=method,
                      proxy_segments=target.segments, proxy_path=target.path,
                      context=_context(request))
        # What the operator sees when the bundle wants approval.
        why = f"{method} {base.host}{target.path} via route {route.name}"
        self._check_length(request, route)
        key_of = d.tokens.token_key if route.credential in ("bearer", "dpop") \
            else d.agents.token_key
        mint = self._minter(route, method, base, base.htu_prefix + path)
        auth, cred = await self.issuance.issue(caller, req, "proxy.allowed", key_of, mint,
                                               reason=why, traceparent=_traceparent(request),
                                               client_id=route.client_id or None)
        headers = _forward_headers(request.headers, base)
        for name, value in cred.headers:
            headers[name] = value
        if cred.assertion:
            headers["Authorization"] = "Bearer " + await self._oauth_token(route, auth, cred)
        # A request without a body (no Content-Length, no chunks) has nothing to read.
        body = await self._read_body(request, route, caller, auth, target) \
            if request.body_exists else b""
        if target.query:
            url += "?" + target.query
        status, sent, prepared = 502, 0, False
        try:
            session = self._session(route.ca_file)
            # encoded=True: the path is ours (normalized, re-encoded) and the
            # query is forwarded as the agent sent it (printable ASCII, checked).
            async with session.request(
                    method, URL(url, encoded=True), headers=headers, data=body or None,
                    allow_redirects=False, compress=None, timeout=base.timeout,
                    skip_auto_headers=_SKIP_CONTENT_TYPE) as upstream:
                status = upstream.status
                if status == 401:  # the cached token is no longer taken: the next call renews
                    self._forget_tokens(route, auth)
                length = upstream.content_length
                if length is not None and length <= _WHOLE_BODY_MAX and method != "HEAD" \
                        and status >= 200 and status not in _NO_BODY_STATUS \
                        and "Transfer-Encoding" not in upstream.headers:
                    # Small and sized: read whole, answered in one write.
                    data = await upstream.content.readexactly(length)
                    whole = web.Response(status=status, reason=upstream.reason, body=data)
                    whole.headers.extend(_response_headers(upstream.headers))
                    sent = len(data)
                    self._completed(caller, auth, route, method, target, status, len(body),
                                    sent, started)
                    return whole
                response = web.StreamResponse(status=status, reason=upstream.reason)
                response.headers.extend(_response_headers(upstream.headers))
                if length is not None and "chunked" not in \
                        upstream.headers.get("Transfer-Encoding", "").lower():
                    response.content_length = length
                prepared = True
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(64 * 1024):
                    sent += len(chunk)
                    await response.write(chunk)
                await response.write_eof()
        except asyncio.CancelledError:  # the agent hung up: the call is still on record
            self._completed(caller, auth, route, method, target,
                            status if prepared else 499, len(body), sent, started,
                            error="the agent went away")
            raise
        except (TimeoutError, ClientError, ssl.SSLError, OSError,
                asyncio.IncompleteReadError) as exc:
            if prepared and isinstance(exc, ConnectionResetError):  # writing to the agent
                self._completed(caller, auth, route, method, target, status,
                                len(body), sent, started, error="the agent went away")
                raise
            reason = ("upstream TLS verification failed"
                      if isinstance(exc, ssl.SSLError) or "SSL" in type(exc).__name__
                      or "Certificate" in type(exc).__name__
                      else "upstream timed out" if isinstance(exc, TimeoutError)
                      else "upstream unreachable")
            _logger.info("proxy: upstream failed",
                         extra={"route": route.name, "error_type": type(exc).__name__})
            self._completed(caller, auth, route, method, target, 502,
                            len(body), sent, started, error=reason)
            if prepared:  # the answer had started: cut the connection
                raise
            return _json_response(502, "upstream", reason)
        self._completed(caller, auth, route, method, target, status,
                        len(body), sent, started)
        return response

    def _check_length(self, request: web.BaseRequest, route: Route) -> None:
        length = request.content_length
        if length is not None and length > route.max_request_bytes:
            raise _Denied(413, f"request body above the route's {route.max_request_bytes} bytes")

    async def _read_body(self, request: web.BaseRequest, route: Route, caller: Caller,
                         auth: Authorized, target: Target) -> bytes:
        """The body, bounded by the route's limit and timeout, read only after the decision.

        A client that waits for ``100 Continue`` gets it only now: an
        unauthorized call never makes it send its body. A body that trickles
        slower than the route's ``timeout`` is cut off (408).
        """
        limit = route.max_request_bytes
        if request.headers.get("Expect", "").lower() == "100-continue" \
                and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        chunks: list[bytes] = []
        size = 0
        refusal: _Denied | None = None
        try:
            async with asyncio.timeout(route.timeout):
                async for chunk in request.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        refusal = _Denied(413, f"request body above the route's {limit} bytes")
                        break
                    chunks.append(chunk)
        except TimeoutError:
            refusal = _Denied(408, "request body not received in time")
        if refusal is not None:
            await self._audit_denied(caller.proc, caller.peer, route, request.method,
                                     target, auth.key.agent, refusal)
            if refusal.status == 408:
                raise web.HTTPRequestTimeout()
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        return b"".join(chunks)

    def _minter(self, route: Route, method: str, base: _Upstream,
                htu: str) -> Callable[[Authorized], Minted[_Credential]]:
        """The mint function for this route's credential (runs on the SigningRunner).

        ``htu``: the URL called, query excluded, already in RFC 9449's
        normalized form (the origin normalized once per route, the path ours).
        """
        d = self.deps

        def mint(auth: Authorized) -> Minted[_Credential]:
            key = auth.key
            self._spend_route_budget(route, key.agent)
            record: dict[str, Any] = {}
            headers: tuple[tuple[str, str], ...]
            if route.credential == "secret":
                headers = ((route.header, route.prefix + self._secret(route)),)
                record["attach"] = {"type": "secret", "name": route.secret}
            elif route.credential == "oauth":
                record["attach"] = {"type": "oauth", "token_endpoint": route.token_endpoint,
                                    "client_id": auth.client_id}
                cached = self._oauth.get(_oauth_key(route, key.agent, auth.client_id))
                if cached is not None and cached[1] > time.monotonic():
                    record["attach"]["cached"] = True
                    return Minted(_Credential((("Authorization", "Bearer " + cached[0]),)),
                                  auth.client_id, {"proxy": {
                                      "route": route.name, "method": method,
                                      "upstream": base.origin, **record}})
                claims = assertions.client_assertion_claims(
                    client_id=auth.client_id, audience=route.token_endpoint, now=d.clock(),
                    ttl_seconds=60, jti=d.new_jti())
                assertion = assertions.mint_client_assertion(claims, key.handle, key.kid)
                record["attach"].update(cached=False, assertion_jti=claims["jti"])
                return Minted(_Credential((), assertion, auth.client_id), auth.client_id,
                              {"proxy": {"route": route.name, "method": method,
                                         "upstream": base.origin, **record}})
            else:
                # The agent's own token key: binds the token (cnf.jkt) and signs the proof.
                proof_key = d.agents.token_key(key.agent) if route.credential == "dpop" \
                    else None
                token, ath, fresh = self._token(route, key, auth, proof_key)
                record["attach"] = {"type": route.credential, "audience": route.audience,
                                    "token_jti": fresh[0], "token_minted": fresh[1]}
                if proof_key is not None:
                    # dpop.proof_claims' checks, with htu normalized by construction.
                    claims = {"htm": dpop.check_method(method), "htu": htu,
                              "iat": int(d.clock()), "jti": d.new_jti(), "ath": ath}
                    proof = self._proof(claims, proof_key)
                    record["attach"]["proof_jti"] = claims["jti"]
                    headers = (("Authorization", "DPoP " + token), ("DPoP", proof))
                else:
                    headers = (("Authorization", "Bearer " + token),)
            return Minted(_Credential(headers), key.spiffe_id, {"proxy": {
                "route": route.name, "method": method, "upstream": base.origin, **record}})

        return mint

    async def _oauth_token(self, route: Route, auth: Authorized, cred: _Credential) -> str:
        """Client credentials at the route's token endpoint with the pipeline's assertion.

        The access token is cached per (route, agent, client id) until 3/4 of
        its ``expires_in``; it never leaves the daemon but for the upstream.
        Calls that find no cached token at once each present their own
        assertion; the last answer wins the cache (assertions are single-use).
        """
        form = {"grant_type": "client_credentials", "client_id": cred.client_id,
                "client_assertion_type": _JWT_BEARER, "client_assertion": cred.assertion}
        if route.scopes:
            form["scope"] = " ".join(route.scopes)
        status, doc = 0, None
        try:
            async with self._session(route.ca_file).post(
                    route.token_endpoint, data=form, allow_redirects=False,
                    timeout=ClientTimeout(total=route.timeout)) as answer:
                status = answer.status
                raw = await answer.content.read(_MAX_TOKEN_RESPONSE + 1)
            doc = json.loads(raw) if len(raw) <= _MAX_TOKEN_RESPONSE else None
        except (TimeoutError, ClientError, ssl.SSLError, OSError, ValueError) as exc:
            raise _Denied(502, "the authorization server could not be reached",
                          detail=f"token endpoint of route {route.name}: "
                                 f"{type(exc).__name__}") from None
        token = doc.get("access_token") if isinstance(doc, dict) else None
        kind = doc.get("token_type", "") if isinstance(doc, dict) else ""
        life = doc.get("expires_in", 300) if isinstance(doc, dict) else 0
        if status != 200 or not isinstance(token, str) or not _TOKEN_RE.match(token) \
                or not isinstance(kind, str) or kind.lower() != "bearer" \
                or not isinstance(life, int) or isinstance(life, bool) or life <= 0:
            error = doc.get("error") if isinstance(doc, dict) else None
            raise _Denied(502, "the authorization server refused the token request",
                          detail=f"token endpoint of route {route.name}: status {status}, "
                                 f"error {str(error)[:64]!r}")
        life = min(life, 24 * 3600)
        if len(self._oauth) >= _TOKEN_CACHE_MAX:
            self._oauth.clear()
        self._oauth[_oauth_key(route, auth.key.agent, cred.client_id)] = (
            token, time.monotonic() + life * (1 - _RENEW_AT))
        return token

    def _forget_tokens(self, route: Route, auth: Authorized) -> None:
        agent = auth.key.agent
        self._oauth.pop(_oauth_key(route, agent, auth.client_id), None)
        for k in [k for k in self._tokens if k[0] == agent and k[1] == route]:
            self._tokens.pop(k, None)

    def _spend_route_budget(self, route: Route, agent: str) -> None:
        if route.rate is None:
            return
        bucket = Bundle(name=f"route:{route.name}", audiences=frozenset(), scopes=frozenset(),
                        kinds=frozenset(), max_ttl=1, rate=route.rate)
        wait = self.route_limiter.wait_time("*", bucket)
        if wait is not None:
            raise _Denied(429, "rate budget of this route exhausted",
                          detail=f"route {route.name} rate budget {route.rate} exhausted "
                                 f"(agent {agent})", retry_after=wait)
        self.route_limiter.consume("*", bucket)

    def _secret(self, route: Route) -> str:
        """The route's secret, unsealed for this call; refusals are audited as denials."""
        if self.secrets is None:
            raise _Denied(403, "the route's secret is not set", detail="no secret store")
        try:
            value = self.secrets.reveal(route.secret)
        except NotFoundError:
            raise _Denied(403, "the route's secret is not set",
                          detail=f"secret {route.secret!r} is not set") from None
        except KeyStoreError as exc:
            raise _Denied(503, "the route's secret cannot be unsealed now",
                          detail=f"secret {route.secret!r}: {exc.detail}") from None
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise _Denied(403, "the route's secret is unusable",
                          detail=f"secret {route.secret!r} is not ASCII") from None

    def _proof(self, claims: dict[str, Any], key: SigningKey) -> str:
        """A DPoP proof as :func:`badged.core.dpop.mint_proof` makes it, the
        header (typ, alg, the key's JWK) encoded once per key rather than per call."""
        header = self._proof_headers.get(key.kid)
        if header is None:
            if len(self._proof_headers) >= _TOKEN_CACHE_MAX:
                self._proof_headers.clear()
            header = self._proof_headers[key.kid] = b64url(canonical_json({
                "typ": dpop.DPOP_TYP, "alg": "ES256",
                "jwk": ec_public_jwk(key.handle.public_key())}))
        handle = key.handle
        sign_raw = getattr(handle, "sign_raw", None)
        if sign_raw is not None:  # r||s from the backend: no DER round trip
            return encode_jws_raw(header, claims, lambda data: bytes(sign_raw(data, dpop.ES256)))
        return encode_jws_with_header(header, claims, lambda data: handle.sign(data, dpop.ES256))

    def _token(self, route: Route, key: SigningKey, auth: Authorized,
               proof_key: SigningKey | None) -> tuple[str, str, tuple[str, bool]]:
        """A cached access token for (agent, route), minted when near expiry;
        bound to ``proof_key`` (``cnf.jkt``) when given.

        Returns the token, its ``ath`` (for DPoP proofs) and (its jti, whether
        it was minted now) for the record.
        """
        d = self.deps
        jkt = proof_key.kid if proof_key is not None else ""
        cache_key = (key.agent, route, key.kid, jkt)
        now = time.monotonic()
        hit = self._tokens.get(cache_key)
        if hit is not None and hit[1] > now:
            return hit[0], hit[3], (hit[2], False)
        extra: dict[str, Any] = {}
        if jkt:
            extra["cnf"] = {"jkt": jkt}
        ttl = auth.decision.ttl or d.default_ttl
        claims = build_claims(issuer=d.issuer, subject=key.spiffe_id, audience=route.audience,
                              scopes=route.scopes, ttl_seconds=ttl, now=d.clock(),
                              jti=d.new_jti(), extra=extra)
        issued = mint_token(claims=claims, key=key.handle, key_id=key.kid)
        ath = dpop.access_token_hash(issued.token) if jkt else ""
        if len(self._tokens) >= _TOKEN_CACHE_MAX:
            self._tokens.clear()
        self._tokens[cache_key] = (issued.token, now + ttl * (1 - _RENEW_AT), issued.jti, ath)
        return issued.token, ath, (issued.jti, True)

    # -- audit ---------------------------------------------------------------------------

    def _completed(self, caller: Caller, auth: Authorized, route: Route, method: str,
                   target: Target, status: int, bytes_in: int, bytes_out: int,
                   started: float, error: str | None = None) -> None:
        """Record the outcome (``proxy.completed``) without holding the connection.

        The decision and the credential's use were made durable before the
        upstream call (``proxy.allowed``, by the pipeline); this record adds
        status, bytes and latency. Nobody waits for it, so it costs no fsync
        of its own: the log's ``append_later`` writes it with the next record
        anyone waits for (typically the next call's ``proxy.allowed``) or at
        most ``LATER_S`` (0.1 s) later, and before the final checkpoint at
        close (docs/proxy.md, "What is on record, and when"). It is made in
        the loop's next pass, once the answer has been handed to the socket,
        so the answer does not wait for it. A sink without ``append_later``
        gets it in the background, counted as a call in flight until written.
        """
        asyncio.get_running_loop().call_soon(
            self._record_completed, caller, auth, route, method, target, status, bytes_in,
            bytes_out, started, error)

    def _record_completed(self, caller: Caller, auth: Authorized, route: Route, method: str,
                          target: Target, status: int, bytes_in: int, bytes_out: int,
                          started: float, error: str | None) -> None:
        record: dict[str, Any] = {
            "event": "proxy.completed", "agent": auth.key.agent,
            "caller": caller.proc.summary(), "decision": "allow", "rule": auth.decision.rule,
            "txn": auth.txn,  # joins the call to its issuance (badgectl audit trace, issue 21)
            "proxy": {"route": route.name, "method": method, "path": target.path,
                      "status": status, "bytes_in": bytes_in, "bytes_out": bytes_out,
                      "latency_ms": round((time.monotonic() - started) * 1000, 3)}}
        if error:
            record["proxy"]["error"] = error
        if self._append_later is not None:
            try:
                self._append_later(record)
            except (BadgedError, ValueError, TypeError) as exc:  # the log's failure: health's
                _logger.error("proxy.completed not audited", extra={"error": str(exc)})
            return
        # Counted as a call in flight until written: the log then hands it to
        # its writer thread (batched with the next call's record) instead of
        # fsyncing it inline on the loop, where the next request would wait.
        if self.calls is not None:
            self.calls.call_started()
        task = asyncio.get_running_loop().create_task(self._append_completed(record))
        self._records.add(task)
        task.add_done_callback(self._records.discard)

    async def _append_completed(self, record: dict[str, Any]) -> None:
        try:
            await self.deps.audit.append(record)
        except (BadgedError, ValueError, TypeError) as exc:  # the log's failure: health's job
            _logger.error("proxy.completed not audited", extra={"error": str(exc)})
        finally:
            if self.calls is not None:
                self.calls.call_done(None)

    async def _audit_denied(self, proc: ProcessAttributes | None, peer: PeerCredentials,
                            route: Route | None, method: str, target: Target | None,
                            agent: str | None, exc: _Denied) -> None:
        who: Mapping[str, object] = proc.summary() if proc is not None else {
            "pid": peer.pid, "uid": peer.uid}
        _logger.info("proxy: denied", extra={"uid": peer.uid, "pid": peer.pid,
                                             "reason": exc.detail})
        await self.deps.audit.append({
            "event": "proxy.denied", "agent": agent, "caller": dict(who), "decision": "deny",
            "rule": "-", "reason": exc.detail[:300], "status": exc.status,
            "request": {"kind": "proxy", "agent": agent, "proxy": {
                "route": route.name if route else None, "method": method[:32],
                "path": target.path[:512] if target else None}}})


@dataclass(frozen=True, slots=True)
class _Upstream:
    origin: str  # https://host[:port], lower-case
    path: str  # the base path, no trailing slash ("" for none)
    host: str  # host[:port], for approvals
    htu_prefix: str  # the origin as RFC 9449 normalizes it (no default port)
    timeout: ClientTimeout  # the route's, for the whole upstream call
    drop: frozenset[str]  # agent headers never forwarded on this route (lower-case)


def _split_upstream(route: Route) -> _Upstream:
    rest = route.upstream[len("https://"):]
    netloc, slash, path = rest.partition("/")
    origin = "https://" + netloc.lower()
    return _Upstream(origin, (slash + path).rstrip("/"), netloc.lower(),
                     dpop.normalize_htu(origin).rstrip("/"),
                     ClientTimeout(total=route.timeout, connect=min(10, route.timeout)),
                     HOP_BY_HOP | _AGENT_CREDENTIAL_HEADERS | {route.header.lower()})


_SKIP_CONTENT_TYPE = ("Content-Type",)


def _target(request: web.BaseRequest) -> Target:
    try:
        return normalize(request.raw_path)
    except PathError as exc:
        raise _Denied(403, f"ambiguous or invalid path refused: {exc}") from None


def _check_framing(headers: CIMultiDictProxy[str], route: Route) -> None:
    """Belt and braces over aiohttp's parser: one framing, stated once."""
    lengths = headers.getall("Content-Length", [])
    encodings = headers.getall("Transfer-Encoding", [])
    if len(lengths) > 1 or (lengths and encodings):
        raise _Denied(400, "conflicting Content-Length / Transfer-Encoding")
    if encodings and [e.strip().lower() for e in ",".join(encodings).split(",")] != ["chunked"]:
        raise _Denied(400, "only Transfer-Encoding: chunked is accepted")


def _forward_headers(incoming: CIMultiDictProxy[str], base: _Upstream) -> CIMultiDict[str]:
    """The agent's headers minus hop-by-hop ones and any credential it tried to set."""
    drop = base.drop
    if "Connection" in incoming:
        drop = drop | {t.strip().lower() for v in incoming.getall("Connection", [])
                       for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


def _response_headers(incoming: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    named = {t.strip().lower() for v in incoming.getall("Connection", [])
             for t in v.split(",")}
    drop = HOP_BY_HOP | named
    return [(k, v) for k, v in incoming.items() if k.lower() not in drop]


def _context(request: web.BaseRequest) -> request_context.Context:
    """``Badged-Context: channel=#deploy, task=INC-42``: the request context
    (issue 21), asserted by the agent like FetchToken's; consumed here, never
    forwarded upstream. Malformed: 400 with the reason."""
    values = request.headers.getall(CONTEXT_HEADER, [])
    if not values:
        return ()
    if len(values) != 1 or len(values[0]) > 1024:
        raise _Denied(400, f"at most one {CONTEXT_HEADER} header, at most 1024 bytes")
    try:
        return request_context.parse_cli(p for p in values[0].split(",") if p.strip())
    except BadgedError as exc:
        raise _Denied(400, exc.caller_message) from None


def _traceparent(request: web.BaseRequest) -> str:
    """The agent's W3C traceparent, for the audit (issue 21); an invalid one is
    ignored, as the Trace Context spec tells a receiver to do."""
    try:
        return request_context.traceparent(request.headers.get("traceparent", ""))
    except BadgedError:
        return ""


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Verified TLS 1.2+: the system trust store, or only the route's CA file."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


__all__ = ["CHANNEL", "ProxyServer", "SecretSource"]
