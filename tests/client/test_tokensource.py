"""TokenSource / AsyncTokenSource timing, failure and concurrency rules.

The daemon call is replaced through the source's ``fetch`` seam and the
clocks are injected, so refresh points, expiry and backoff are checked to the
second; tests/client/test_tokensource_daemon.py runs the same source against
a real daemon that is stopped and restarted.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Callable

import pytest

from badgeclient import Token
from badgeclient.errors import PermissionDeniedError, UnavailableError
from badgeclient.tokensource import AsyncTokenSource, CredentialExpiredError, TokenKey, TokenSource


class Clock:
    """A monotonic and a wall clock that move together when told to."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


class Daemon:
    """Stands in for the daemon's FetchToken: mints numbered tokens of ``ttl`` seconds."""

    def __init__(self, clock: Clock, ttl: int = 300, delay: float = 0.0) -> None:
        self.clock, self.ttl, self.delay = clock, ttl, delay
        self.calls: list[TokenKey] = []
        self.fail: Exception | None = None
        self._n = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self, key: TokenKey) -> Token:
        with self._lock:
            self.calls.append(key)
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        n = next(self._n)
        iat = int(self.clock.wall)
        return Token(token=f"tok-{n}", agent=key.agent or "a", spiffe_id="spiffe://x/a",
                     issued_at=iat, expires_at=iat + self.ttl, jti=f"j{n}", key_id="k")


def source(clock: Clock, daemon: Daemon, **kw: object) -> TokenSource:
    return TokenSource(fetch=daemon, monotonic=lambda: clock.mono, wall=lambda: clock.wall,
                       rng=random.Random(7), **kw)  # type: ignore[arg-type]


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_cached_until_refresh_point_then_refreshed_in_background() -> None:
    clock = Clock()
    daemon = Daemon(clock, ttl=300)  # refresh point: 80 % = 240 s (60 s left > 30 s)
    with source(clock, daemon) as ts:
        first = ts.token("https://api", ["write", "read"])
        assert ts.token("https://api", ["read", "write", "read"]) is first  # scopes are a set
        clock.advance(239)
        assert ts.token("https://api", ["read", "write"]) is first
        assert len(daemon.calls) == 1
        clock.advance(2)  # past the refresh point: still served at once, refreshed behind
        assert ts.token("https://api", ["read", "write"]) is first
        wait_for(lambda: len(daemon.calls) == 2)
        wait_for(lambda: ts.token("https://api", ["read", "write"]).token == "tok-2")
        # Other keys are other entries.
        assert ts.token("https://api", ["read"]).token == "tok-3"
        assert ts.token("https://other", ["read"], agent="b").token == "tok-4"


def test_short_token_refreshes_30s_before_exp() -> None:
    clock = Clock()
    daemon = Daemon(clock, ttl=60)  # 80 % would be 48 s; 30 s before exp comes first
    with source(clock, daemon, background=False) as ts:
        first = ts.token("aud")
        clock.advance(29)
        ts.token("aud")
        assert len(daemon.calls) == 1
        clock.advance(2)
        assert ts.token("aud") is first
        wait_for(lambda: len(daemon.calls) == 2)


def test_daemon_away_cached_token_served_until_exp_then_typed_error() -> None:
    clock = Clock()
    daemon = Daemon(clock, ttl=100)
    with source(clock, daemon, backoff_initial=1.0, backoff_max=8.0) as ts:
        first = ts.token("aud")
        daemon.fail = UnavailableError("no badged socket", status="UNAVAILABLE")
        clock.advance(75)  # past the refresh point (70 s): the refresh fails ...
        assert ts.token("aud") is first
        wait_for(lambda: len(daemon.calls) == 2)
        # ... and is retried with backoff, not on every call.
        for _ in range(50):
            assert ts.token("aud") is first
        time.sleep(0.1)
        assert len(daemon.calls) == 2
        clock.advance(24)  # 99 s: exp minus the 1 s leeway
        with pytest.raises(CredentialExpiredError) as info:
            ts.token("aud")
        assert isinstance(info.value, UnavailableError)
        assert isinstance(info.value.cause, UnavailableError)
        # Within the backoff window a caller is not sent to the daemon.
        calls = len(daemon.calls)
        with pytest.raises(CredentialExpiredError):
            ts.token("aud")
        assert len(daemon.calls) == calls
        # The daemon is back: the next attempt after the backoff succeeds.
        daemon.fail = None
        clock.advance(9)
        assert ts.token("aud").token.startswith("tok-")
        assert ts.token("aud") is not first


def test_backoff_grows_with_jitter() -> None:
    clock = Clock()
    daemon = Daemon(clock, ttl=100)
    daemon.fail = UnavailableError("down", status="UNAVAILABLE")
    ts = source(clock, daemon, backoff_initial=1.0, backoff_max=16.0, background=False)
    with pytest.raises(UnavailableError) as first:
        ts.token("aud")
    assert not isinstance(first.value, CredentialExpiredError)  # first contact: the real error
    waits = []
    for _ in range(6):
        with pytest.raises(CredentialExpiredError) as info:
            ts.token("aud")
        waits.append(info.value.retry_in)
        clock.advance(info.value.retry_in + 0.001)
        with pytest.raises(CredentialExpiredError):
            ts.token("aud")  # the attempt after the wait, failing again
    # Equal jitter: each wait is in [d/2, d] with d doubling up to the cap.
    for i, w in enumerate(waits[:4]):
        d = min(16.0, 2.0 ** i)
        assert d / 2 <= w <= d, (i, w)
    assert max(waits) <= 16.0
    ts.close()


def test_refusal_is_raised_as_is_and_not_cached() -> None:
    clock = Clock()
    daemon = Daemon(clock)
    daemon.fail = PermissionDeniedError("policy denied", status="PERMISSION_DENIED",
                                        code="policy_denied")
    with source(clock, daemon) as ts:
        with pytest.raises(PermissionDeniedError):
            ts.token("aud")
        with pytest.raises(PermissionDeniedError):
            ts.token("aud")
        assert len(daemon.calls) == 2  # no backoff: a fixed policy is used at once
        assert len(ts) == 0
        daemon.fail = None
        assert ts.token("aud").token == "tok-1"


def test_one_fetch_for_many_threads_and_bounded_cache() -> None:
    clock = Clock()
    daemon = Daemon(clock, delay=0.2)
    with source(clock, daemon, max_entries=3) as ts:
        got: list[str] = []
        threads = [threading.Thread(target=lambda: got.append(ts.token("aud").token))
                   for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == ["tok-1"] * 16
        assert len(daemon.calls) == 1
        daemon.delay = 0
        for i in range(10):
            ts.token(f"aud-{i}")
        assert len(ts) == 3


def test_invalidate_drops_a_refused_token() -> None:
    clock = Clock()
    daemon = Daemon(clock)
    with source(clock, daemon) as ts:
        first = ts.token("aud")
        ts.invalidate(first.token)
        assert ts.token("aud").token == "tok-2"


def test_idle_key_is_not_refreshed_forever() -> None:
    """Nobody asked since the last fetch: the refresher leaves it to lapse."""
    clock = Clock()
    daemon = Daemon(clock, ttl=100)
    with source(clock, daemon) as ts:
        ts.token("aud")
        clock.advance(75)
        ts.token("aud")  # used after the refresh point: refreshed once
        wait_for(lambda: len(daemon.calls) == 2)
        clock.advance(80)  # the new token's refresh point passes with no caller
        time.sleep(1.5)  # the worker looks at least once a second
        assert len(daemon.calls) == 2


def test_async_source_shares_one_fetch_and_refreshes_in_a_task() -> None:
    clock = Clock()
    daemon = Daemon(clock, ttl=300, delay=0.1)

    async def main() -> None:
        async with AsyncTokenSource(fetch=daemon, monotonic=lambda: clock.mono,
                                    wall=lambda: clock.wall) as ts:
            toks = await asyncio.gather(*(ts.token("aud", ["r"]) for _ in range(20)))
            assert {t.token for t in toks} == {"tok-1"}
            assert len(daemon.calls) == 1
            clock.advance(241)
            assert (await ts.token("aud", ["r"])).token == "tok-1"  # at once, refresh behind
            for _ in range(100):
                if len(daemon.calls) == 2 and (await ts.token("aud", ["r"])).token == "tok-2":
                    break
                await asyncio.sleep(0.02)
            assert (await ts.token("aud", ["r"])).token == "tok-2"
            daemon.fail = UnavailableError("down", status="UNAVAILABLE")
            clock.advance(300)
            with pytest.raises(CredentialExpiredError):
                await ts.token("aud", ["r"])

    asyncio.run(main())


def test_cache_hit_is_cheap() -> None:
    clock = Clock()
    clock.wall = time.time()  # the source runs on the real clocks here
    with TokenSource(fetch=Daemon(clock)) as ts:
        ts.token("aud", ["read"])
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            ts.token("aud", ["read"])
        per_call = (time.perf_counter() - t0) / n
    print(f"TokenSource cache hit: {per_call * 1e6:.2f} us")
    assert per_call < 50e-6  # target 10 us; generous for a loaded shared machine
