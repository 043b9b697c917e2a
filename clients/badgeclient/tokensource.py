"""Cached, self-refreshing credentials for agent processes.

Fetching a token from the daemon costs a socket round trip and a hardware
signature (about a millisecond); an agent making many HTTP calls wants the
same token until shortly before it expires. ::

    from badgeclient import TokenSource

    with TokenSource() as tokens:                       # $BADGED_SOCKET
        tok = tokens.token(audience="https://api.example.com", scopes=["read"])

The cache is keyed by (kind, audience, scopes, agent, DPoP binding). A token
is returned from the cache until its *refresh point* -- 80 % of its lifetime
or 30 s before ``exp``, whichever comes first -- and is then refreshed in the
background while the cached one keeps being served. If the daemon is away
(restart, upgrade), the source reconnects with a fresh channel and retries
with exponential backoff and jitter; callers notice nothing until the cached
token has actually expired, and then get :class:`CredentialExpiredError`.

Refresh timing uses the monotonic clock (a wall-clock step cannot make the
cache refresh early or late); expiry is checked against both the token's
``exp`` on the wall clock and the monotonic time elapsed since the fetch, and
the earlier wins, so a clock stepped backwards cannot serve an expired token.
Both clocks are parameters, for tests.

:class:`AsyncTokenSource` is the asyncio twin; the gRPC call runs in a worker
thread so the event loop never blocks on the daemon.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, Self

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from badgeclient.client import DEFAULT_SOCKET, Token, WorkloadClient
from badgeclient.errors import BadgeError, RateLimitedError, UnavailableError

Clock = Callable[[], float]

#: The refresh point: this fraction of the lifetime has passed ...
REFRESH_FRACTION = 0.8
#: ... or this many seconds are left, whichever comes first.
REFRESH_MARGIN = 30.0
#: A token with less than this left is treated as expired (it could expire in flight).
EXPIRY_LEEWAY = 1.0
#: Entries kept; the least recently used is dropped beyond it.
MAX_ENTRIES = 256
BACKOFF_INITIAL = 0.25
BACKOFF_MAX = 30.0
#: The background refresher looks at the cache at least this often (seconds).
POLL_SECONDS = 1.0
SPIFFE_HEADER = ("workload.spiffe.io", "true")


class CredentialExpiredError(UnavailableError):
    """No usable credential: the cached one (if any) expired and the daemon cannot give a new one.

    ``cause`` is the daemon's (or the socket's) last error; ``retry_in`` the
    seconds until the source tries again.
    """

    def __init__(self, message: str, *, cause: BadgeError, retry_in: float) -> None:
        super().__init__(message, status=cause.status or "UNAVAILABLE", code=cause.code)
        self.cause = cause
        self.retry_in = retry_in


class TokenKey(NamedTuple):
    """What a cached credential was asked for; scopes are a set (order does not matter).

    A tuple, not a dataclass: it is hashed on every cache hit.
    """

    kind: str  # "token" or "jwt_svid"
    audience: tuple[str, ...]
    scopes: tuple[str, ...]
    agent: str
    dpop_bound: bool

    @classmethod
    def make(cls, kind: str, audience: str | Iterable[str], scopes: Iterable[str], agent: str | None,
             dpop_bound: bool) -> TokenKey:
        auds = (audience,) if isinstance(audience, str) else tuple(sorted(set(audience)))
        return cls(kind, auds, tuple(sorted(set(scopes))), agent or "", dpop_bound)


def _retryable(err: BadgeError) -> bool:
    """Worth retrying later: the daemon is away or busy, not refusing on principle."""
    return isinstance(err, (UnavailableError, RateLimitedError))


def _jwt_times(jwt: str) -> tuple[int, int, str]:
    """iat, exp and jti of a JWT from the local daemon, *unverified*: used only
    for cache timing, never for a trust decision."""
    try:
        payload = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return int(claims["iat"]), int(claims["exp"]), str(claims.get("jti", ""))
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise UnavailableError("daemon returned a JWT-SVID without iat/exp",
                               status="INTERNAL") from exc


FETCH_JWT_SVID = "/SpiffeWorkloadAPI/FetchJWTSVID"


@functools.cache
def _jwt_svid_messages() -> tuple[type[Message], type[Message]]:
    """JWTSVIDRequest/Response (SPIFFE Workload API) in a private descriptor pool.

    The SPIFFE protos have no package, so their generated modules (ours in
    badged_proto.spiffe, py-spiffe's own) collide in protobuf's default pool:
    an agent that also uses py-spiffe could not import both. Only the two
    messages this source needs are described here, field numbers as in
    protos/badged_proto/spiffe/workload.proto.
    """
    f = descriptor_pb2.FileDescriptorProto(name="badgeclient/jwt_svid.proto", syntax="proto3")
    string, message = descriptor_pb2.FieldDescriptorProto.TYPE_STRING, \
        descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
    one, many = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, \
        descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    req = f.message_type.add(name="JWTSVIDRequest")
    req.field.add(name="audience", number=1, type=string, label=many)
    req.field.add(name="spiffe_id", number=2, type=string, label=one)
    svid = f.message_type.add(name="JWTSVID")
    for number, name in enumerate(("spiffe_id", "svid", "hint"), start=1):
        svid.field.add(name=name, number=number, type=string, label=one)
    resp = f.message_type.add(name="JWTSVIDResponse")
    resp.field.add(name="svids", number=1, type=message, label=many, type_name=".JWTSVID")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("JWTSVIDRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("JWTSVIDResponse")))


class _Fetcher:
    """Owns the channel to the daemon and replaces it after the daemon went away.

    grpcio's channel backs off reconnects up to two minutes after failures; a
    fresh channel connects at once, so a restarted daemon is used as soon as
    it is back.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None, timeout: float) -> None:
        self._path = socket_path or os.environ.get("BADGED_SOCKET") or DEFAULT_SOCKET
        self._timeout = timeout
        self._lock = threading.Lock()
        self._client: WorkloadClient | None = None

    def _get(self) -> WorkloadClient:
        with self._lock:
            if self._client is None:
                self._client = WorkloadClient(self._path, timeout=self._timeout)
            return self._client

    def _drop(self, client: WorkloadClient) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        client.close()

    def fetch(self, key: TokenKey) -> Token:
        client = self._get()
        try:
            if key.kind == "jwt_svid":
                return self._jwt_svid(client, key)
            return client.fetch_token(audience=key.audience[0], scopes=key.scopes,
                                      agent=key.agent or None, dpop_bound=key.dpop_bound)
        except UnavailableError:
            self._drop(client)
            raise

    def _jwt_svid(self, client: WorkloadClient, key: TokenKey) -> Token:
        request_cls, response_cls = _jwt_svid_messages()
        call = client._channel.unary_unary(
            FETCH_JWT_SVID, request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString)

        def fetch(req: Message, *, timeout: float) -> Message:
            return call(req, timeout=timeout, metadata=(SPIFFE_HEADER,))

        req = request_cls()
        getattr(req, "audience").extend(key.audience)  # noqa: B009 -- a dynamic message class
        setattr(req, "spiffe_id", key.agent)  # noqa: B010
        r = client._call(fetch, req)
        svids = getattr(r, "svids", ())
        if not svids:
            raise UnavailableError("daemon returned no JWT-SVID", status="INTERNAL")
        jwt, spiffe_id = str(svids[0].svid), str(svids[0].spiffe_id)
        iat, exp, jti = _jwt_times(jwt)
        return Token(token=jwt, agent="", spiffe_id=spiffe_id, issued_at=iat,
                     expires_at=exp, jti=jti, key_id="")

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class _Entry:
    """One cached credential and its refresh bookkeeping (guarded by the source's lock)."""

    __slots__ = ("expires_mono", "expires_wall", "failures", "fetch_lock", "fetched_mono",
                 "last_error", "last_used", "refresh_mono", "refreshing", "retry_mono", "token")

    def __init__(self) -> None:
        self.token: Token | None = None
        self.fetched_mono = 0.0
        self.refresh_mono = 0.0
        self.expires_mono = 0.0
        self.expires_wall = 0.0
        self.last_used = 0.0
        self.failures = 0
        self.retry_mono = 0.0
        self.last_error: BadgeError | None = None
        self.refreshing = False
        # One fetch per key at a time: callers of an expired key wait for it.
        self.fetch_lock = threading.Lock()


@dataclass(frozen=True)
class _Timing:
    monotonic: Clock
    wall: Clock
    refresh_fraction: float
    refresh_margin: float
    leeway: float
    backoff_initial: float
    backoff_max: float
    rng: random.Random

    def store(self, e: _Entry, tok: Token) -> None:
        """Record a fresh token: when to refresh it, when it is dead."""
        mono, wall = self.monotonic(), self.wall()
        lifetime = max(float(tok.expires_at - tok.issued_at), 0.0)
        remaining = tok.expires_at - wall
        # Refresh at 80 % of the lifetime or 30 s before exp, whichever first,
        # but never in the first half (a 20 s token is not refreshed constantly).
        margin = min(max((1 - self.refresh_fraction) * lifetime, self.refresh_margin), 0.5 * lifetime)
        e.token = tok
        e.fetched_mono = mono
        e.refresh_mono = mono + max(remaining - margin, 0.0)
        e.expires_mono = mono + remaining
        e.expires_wall = float(tok.expires_at)
        e.failures = 0
        e.retry_mono = 0.0
        e.last_error = None

    def expired(self, e: _Entry, mono: float) -> bool:
        return (e.token is None or mono >= e.expires_mono - self.leeway
                or self.wall() >= e.expires_wall - self.leeway)

    def failed(self, e: _Entry, err: BadgeError) -> None:
        """Back off exponentially, with jitter so a fleet of agents does not
        reconnect in lockstep when their daemon comes back."""
        e.failures += 1
        e.last_error = err
        delay = min(self.backoff_max, self.backoff_initial * 2 ** min(e.failures - 1, 30))
        delay *= 0.5 + 0.5 * self.rng.random()
        if isinstance(err, RateLimitedError) and err.retry_after:
            delay = max(delay, float(err.retry_after))
        e.retry_mono = self.monotonic() + delay

    def refresh_due(self, e: _Entry, mono: float) -> bool:
        return (e.token is not None and not e.refreshing and mono >= e.refresh_mono
                and mono >= e.retry_mono)


def _expired_error(key: TokenKey, e: _Entry, mono: float) -> BadgeError:
    """The error for a key with no usable token while the source backs off.

    A daemon that is away gives :class:`CredentialExpiredError`; a daemon that
    refuses (policy changed) gives a fresh error of the refusal's own type.
    """
    cause = e.last_error or UnavailableError("daemon unavailable", status="UNAVAILABLE")
    if not _retryable(cause):
        return type(cause)(cause.message, status=cause.status, code=cause.code)
    what = "cached credential expired" if e.token is not None else "no credential yet"
    return CredentialExpiredError(f"{what} for {key.audience[0]!r} and the daemon cannot issue "
                                  f"one: {cause.message}", cause=cause,
                                  retry_in=max(e.retry_mono - mono, 0.0))


def _caller_error(key: TokenKey, e: _Entry, err: BadgeError, mono: float) -> BadgeError:
    """What a caller waiting for a fetch that failed with ``err`` gets."""
    if not _retryable(err) or (e.token is None and e.failures <= 1):
        return err  # a refusal, or first contact: the real error, typed by the client
    return _expired_error(key, e, mono)


class _SourceBase:
    def __init__(self, socket_path: str | os.PathLike[str] | None, *, timeout: float,
                 fetch: Callable[[TokenKey], Token] | None, monotonic: Clock, wall: Clock,
                 max_entries: int, refresh_fraction: float, refresh_margin: float,
                 expiry_leeway: float, backoff_initial: float, backoff_max: float,
                 rng: random.Random | None) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not 0 < refresh_fraction < 1:
            raise ValueError("refresh_fraction must be between 0 and 1")
        self._fetcher: _Fetcher | None = None
        if fetch is None:
            self._fetcher = _Fetcher(socket_path, timeout)
            fetch = self._fetcher.fetch
        self._fetch = fetch
        self._t = _Timing(monotonic, wall, refresh_fraction, refresh_margin, expiry_leeway,
                          backoff_initial, backoff_max, rng or random.Random())
        self._max = max_entries
        self._entries: collections.OrderedDict[TokenKey, _Entry] = collections.OrderedDict()
        # The arguments as given -> their canonical key: a cache hit skips
        # sorting the scopes. Bounded like the cache (cleared when full).
        self._aliases: dict[tuple[object, ...], TokenKey] = {}
        self.fetches = 0  # daemon round trips made, for tests and metrics

    def _key(self, kind: str, audience: str | Sequence[str], scopes: Sequence[str],
             agent: str | None, dpop_bound: bool) -> TokenKey:
        raw = (kind, audience if isinstance(audience, str) else tuple(audience), tuple(scopes),
               agent, dpop_bound)
        key = self._aliases.get(raw)
        if key is None:
            key = TokenKey.make(kind, audience, scopes, agent, dpop_bound)
            if len(self._aliases) >= 4 * self._max:
                self._aliases.clear()
            self._aliases[raw] = key
        return key

    def _entry(self, key: TokenKey) -> _Entry:
        """The entry for key, created if needed; evicts the least recently used."""
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = _Entry()
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return e

    def _record(self, key: TokenKey, e: _Entry, tok: Token | None, err: BadgeError | None) -> None:
        """Book a fetch's outcome on its entry (the caller holds the lock, if any)."""
        self.fetches += 1
        e.refreshing = False
        if tok is not None:
            self._t.store(e, tok)
        elif err is not None:
            if e.token is None and not _retryable(err):
                # Refused before anything was cached (bad audience, no
                # policy): nothing to back off from -- a corrected policy
                # is used on the next call.
                e.failures, e.last_error = 1, None
                if self._entries.get(key) is e:
                    del self._entries[key]
            else:
                self._t.failed(e, err)

    def _evict_dead(self, mono: float) -> None:
        """Drop expired entries nobody is refreshing: they cost memory and nothing else."""
        for k in [k for k, e in self._entries.items()
                  if not e.refreshing and e.token is not None and self._t.expired(e, mono)
                  and e.last_used < e.fetched_mono]:
            del self._entries[k]

    def invalidate(self, token: str) -> None:
        """Forget a token a server refused (e.g. after a key rotation): the next call fetches."""
        for k in [k for k, e in list(self._entries.items()) if e.token and e.token.token == token]:
            self._entries.pop(k, None)

    def __len__(self) -> int:
        return len(self._entries)


class TokenSource(_SourceBase):
    """Thread-safe cache of daemon credentials with background refresh.

    ``fetch`` replaces the daemon call (a function of :class:`TokenKey`), e.g.
    to put another transport underneath; by default the source owns a
    :class:`WorkloadClient` on ``socket_path``. ``background=False`` refreshes
    on access, in a short-lived thread, instead of keeping a refresher thread.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, timeout: float = 10.0,
                 fetch: Callable[[TokenKey], Token] | None = None,
                 monotonic: Clock = time.monotonic, wall: Clock = time.time,
                 max_entries: int = MAX_ENTRIES, refresh_fraction: float = REFRESH_FRACTION,
                 refresh_margin: float = REFRESH_MARGIN, expiry_leeway: float = EXPIRY_LEEWAY,
                 backoff_initial: float = BACKOFF_INITIAL, backoff_max: float = BACKOFF_MAX,
                 background: bool = True, rng: random.Random | None = None) -> None:
        super().__init__(socket_path, timeout=timeout, fetch=fetch, monotonic=monotonic, wall=wall,
                         max_entries=max_entries, refresh_fraction=refresh_fraction,
                         refresh_margin=refresh_margin, expiry_leeway=expiry_leeway,
                         backoff_initial=backoff_initial, backoff_max=backoff_max, rng=rng)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._background = background
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- public API ----------------------------------------------------------------

    def token(self, audience: str, scopes: Sequence[str] = (), *, agent: str | None = None,
              dpop_bound: bool = False) -> Token:
        """An access token for ``audience`` with ``scopes``, from the cache when it is fresh."""
        return self._get(self._key("token", audience, scopes, agent, dpop_bound))

    def jwt_svid(self, audience: str | Sequence[str], *, spiffe_id: str | None = None) -> Token:
        """A SPIFFE JWT-SVID (``Token.token`` is the SVID), cached the same way."""
        return self._get(self._key("jwt_svid", audience, (), spiffe_id, False))

    def invalidate(self, token: str) -> None:
        with self._lock:
            super().invalidate(token)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._entries.clear()
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._fetcher is not None:
            self._fetcher.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------

    def _get(self, key: TokenKey) -> Token:
        t = self._t
        with self._lock:
            if self._closed:
                raise RuntimeError("TokenSource is closed")
            mono = t.monotonic()
            e = self._entry(key)
            e.last_used = mono
            if not t.expired(e, mono):
                if t.refresh_due(e, mono):
                    self._kick(key, e)
                assert e.token is not None
                return e.token
        # Expired or never fetched: fetch now, one thread per key at a time;
        # the others wait for it and take its result.
        with e.fetch_lock:
            with self._lock:
                mono = t.monotonic()
                if not t.expired(e, mono):
                    assert e.token is not None
                    return e.token
                if e.last_error is not None and mono < e.retry_mono:
                    raise _expired_error(key, e, mono)
            err = self._fetch_locked(key, e)
            with self._lock:
                if err is None:
                    assert e.token is not None
                    return e.token
                out = _caller_error(key, e, err, t.monotonic())
            if out is err:
                raise err
            raise out from err

    def _fetch_locked(self, key: TokenKey, e: _Entry) -> BadgeError | None:
        """One daemon call for ``key`` (``e.fetch_lock`` held); its outcome is on the entry."""
        tok: Token | None = None
        err: BadgeError | None = None
        try:
            tok = self._fetch(key)
        except BadgeError as exc:
            err = exc
        with self._lock:
            self._record(key, e, tok, err)
            if tok is not None and self._background and not self._closed:
                self._ensure_thread()
        return err

    def _kick(self, key: TokenKey, e: _Entry) -> None:
        """Past the refresh point on access: refresh in the background (lock held)."""
        if self._background:
            self._ensure_thread()
            self._wake.notify()
        else:
            e.refreshing = True
            threading.Thread(target=self._refresh, args=(key, e), daemon=True,
                             name="badged-token-refresh").start()

    def _refresh(self, key: TokenKey, e: _Entry) -> None:
        if not e.fetch_lock.acquire(blocking=False):
            with self._lock:
                e.refreshing = False
            return  # a caller is fetching it right now
        try:
            self._fetch_locked(key, e)
        finally:
            e.fetch_lock.release()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, daemon=True,
                                            name="badged-token-refresher")
            self._thread.start()

    def _worker(self) -> None:
        """Refreshes entries past their refresh point that were used since their last fetch.

        An entry nobody asked for since its fetch is left to lapse: an agent
        that stopped calling an API does not keep the daemon minting for it.
        """
        t = self._t
        while True:
            with self._lock:
                if self._closed:
                    return
                mono = t.monotonic()
                self._evict_dead(mono)
                due = [(k, e) for k, e in self._entries.items()
                       if t.refresh_due(e, mono) and e.last_used > e.fetched_mono]
                if not due:
                    nxt = min((max(e.refresh_mono, e.retry_mono) for e in self._entries.values()
                               if e.token is not None and e.last_used > e.fetched_mono),
                              default=mono + POLL_SECONDS)
                    self._wake.wait(timeout=min(max(nxt - mono, 0.01), POLL_SECONDS))
                    continue
                for _, e in due:
                    e.refreshing = True
            for k, e in due:
                self._refresh(k, e)


class AsyncTokenSource(_SourceBase):
    """The asyncio twin of :class:`TokenSource`; use it from one event loop.

    The daemon call runs in the default executor; callers awaiting the same
    key share one fetch; a refresh past the refresh point runs as a task, so
    the caller that triggers it still gets the cached token at once.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, timeout: float = 10.0,
                 fetch: Callable[[TokenKey], Token] | None = None,
                 monotonic: Clock = time.monotonic, wall: Clock = time.time,
                 max_entries: int = MAX_ENTRIES, refresh_fraction: float = REFRESH_FRACTION,
                 refresh_margin: float = REFRESH_MARGIN, expiry_leeway: float = EXPIRY_LEEWAY,
                 backoff_initial: float = BACKOFF_INITIAL, backoff_max: float = BACKOFF_MAX,
                 rng: random.Random | None = None) -> None:
        super().__init__(socket_path, timeout=timeout, fetch=fetch, monotonic=monotonic, wall=wall,
                         max_entries=max_entries, refresh_fraction=refresh_fraction,
                         refresh_margin=refresh_margin, expiry_leeway=expiry_leeway,
                         backoff_initial=backoff_initial, backoff_max=backoff_max, rng=rng)
        self._inflight: dict[TokenKey, asyncio.Future[Token]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def token(self, audience: str, scopes: Sequence[str] = (), *, agent: str | None = None,
                    dpop_bound: bool = False) -> Token:
        """An access token for ``audience`` with ``scopes``, from the cache when it is fresh."""
        return await self._get(self._key("token", audience, scopes, agent, dpop_bound))

    async def jwt_svid(self, audience: str | Sequence[str], *, spiffe_id: str | None = None) -> Token:
        """A SPIFFE JWT-SVID (``Token.token`` is the SVID), cached the same way."""
        return await self._get(self._key("jwt_svid", audience, (), spiffe_id, False))

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._entries.clear()
        if self._fetcher is not None:
            await asyncio.to_thread(self._fetcher.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _get(self, key: TokenKey) -> Token:
        if self._closed:
            raise RuntimeError("AsyncTokenSource is closed")
        t = self._t
        mono = t.monotonic()
        e = self._entry(key)
        e.last_used = mono
        if not t.expired(e, mono):
            assert e.token is not None
            if t.refresh_due(e, mono) and key not in self._inflight:
                e.refreshing = True
                task = asyncio.get_running_loop().create_task(self._refresh(key, e))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return e.token
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        if e.last_error is not None and mono < e.retry_mono:
            raise _expired_error(key, e, mono)
        err = await self._fetch_shared(key, e)
        if err is None:
            assert e.token is not None
            return e.token
        out = _caller_error(key, e, err, t.monotonic())
        if out is err:
            raise err
        raise out from err

    async def _fetch_shared(self, key: TokenKey, e: _Entry) -> BadgeError | None:
        """One daemon call for ``key``; callers arriving meanwhile await its future."""
        fut: asyncio.Future[Token] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        tok: Token | None = None
        err: BadgeError | None = None
        try:
            tok = await asyncio.to_thread(self._fetch, key)
        except BadgeError as exc:
            err = exc
        except BaseException as exc:
            fut.set_exception(exc) if isinstance(exc, Exception) else fut.cancel()
            if not fut.cancelled():
                fut.exception()  # retrieved: only the waiters re-raise it
            raise
        finally:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
        self._record(key, e, tok, err)
        if tok is not None:
            fut.set_result(tok)
            self._evict_dead(self._t.monotonic())
        else:
            assert err is not None
            out = _caller_error(key, e, err, self._t.monotonic())
            fut.set_exception(out)
            fut.exception()
        return err

    async def _refresh(self, key: TokenKey, e: _Entry) -> None:
        await self._fetch_shared(key, e)  # failures are booked on the entry
