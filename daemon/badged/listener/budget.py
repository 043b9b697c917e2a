"""What a local caller can make the front hold, before and after it is authorized.

The workload socket is open to every local user, so everything a connection
can make the daemon keep (sockets, streams, request bytes, running handlers)
is bounded *before* the caller is known to policy (issue 16). Bounds are
kept per connection (HTTP/2 flow control and MAX_CONCURRENT_STREAMS, in
``http2.py``), per uid (``UidUsage``: connections, open streams, buffered
request bytes, handlers in flight) and for the whole daemon (a connection
cap below the file-descriptor limit, with a reserve for the admin socket).

Request bytes are bounded by flow control, not by dropping what was sent:
``exposure`` is what a uid's connections may still send plus what they have
sent and we still hold, and it never exceeds ``Budget.buffered``. Every
connection starts with the protocol's 65,535-byte window (which cannot be
withheld, hence ``buffered ≥ connections x 65,535 + one message``); more is
granted, up to ``conn_buffer`` per connection, only while the uid's
exposure has room, and given back as bodies are handed to handlers. A uid
that fills its budget with bodies it never finishes simply stalls until the
body timeout closes those connections: nothing is evicted and reopened, so
it cannot churn the daemon's CPU either.

A uid that matches no policy rule gets the smallest budget (``unbound``):
it can still ask WhoAmI, read the JWKS or check health, but it cannot make
the daemon hold much for it. The classification is conservative (``could
match``): a rule without a uid or user selector could match any uid.

At a per-uid cap the *oldest* idle connection (or the oldest stream still
waiting for its body) of that uid is evicted rather than the newest caller
refused, so one compromised agent cannot lock its sibling processes out.

Bytes and counts do not bound *time*: a uid that matches no rule could still
keep the event loop busy with work that is cheap to send and dear to process
(a 64 KiB Huffman-coded header block takes ~26 ms to decode, a rapid-reset
batch ~50 refusals, reconnecting after every GOAWAY), and every legitimate
call in flight waits for each such stretch (issue 16: FetchToken p99 went
from 19 ms to 237 ms under 4 such uids). So such uids are also *metered*
(``CpuMeter``): the loop time spent on their connections (reading and
framing their input, accepting them, running their handlers) is charged to
a per-uid bucket and to one bucket shared by all of them; when either is
empty, the uid's connections stop being read until it has refilled. Bound
uids are not metered (no cost on their path).
"""

from __future__ import annotations

import logging
import pwd
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from badged.policy.model import Policy

_logger = logging.getLogger(__name__)

FDS_PER_CONNECTION = 2  # the socket and its pidfd
FD_RESERVE = 128  # files, the audit log, the token's own descriptors, logging
MAX_CONNECTIONS = 4096  # whatever the fd limit: each connection also costs memory


@dataclass(frozen=True)
class Budget:
    """What one uid may hold at once, across all its connections on one socket."""

    connections: int
    streams: int  # open streams, handlers still running included
    handlers: int  # handlers in flight
    buffered: int  # request bytes held before their message was complete


@dataclass(frozen=True)
class FrontLimits:
    """Every bound of the front; ``check()`` runs at start-up."""

    max_message: int = 128 * 1024
    conn_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS
    conn_buffer: int = 1 << 20  # most receive window one connection is granted
    bound: Budget = Budget(connections=256, streams=1024, handlers=256, buffered=32 << 20)
    unbound: Budget = Budget(connections=16, streams=64, handlers=16, buffered=2 << 20)
    admin_connections: int = 64  # the admin socket's own reserve, outside the workload cap
    max_connections: int | None = None  # None: from RLIMIT_NOFILE (see connection_cap)
    # Loop time uids that match no rule may take (see CpuMeter): each, and all together,
    # as a share of one core, plus how much one may spend at once before the share applies.
    unbound_cpu_per_uid: float = 0.04
    unbound_cpu: float = 0.12
    cpu_burst: float = 0.005
    preface_timeout: float = 10.0  # accept → first complete request headers
    body_timeout: float = 10.0  # request headers → the end of its body
    idle_timeout: float = 300.0  # no stream open for this long → GOAWAY
    send_timeout: float = 30.0  # an answer the client does not take for this long
    sweep_interval: float = 1.0

    @property
    def stream_window(self) -> int:
        """One request message and its 5-byte gRPC prefix: the stream window we advertise."""
        return self.max_message + 5

    def check(self) -> None:
        """Invariants: windows match the message cap; budgets are positive and nested."""
        from badged.listener.http2 import DEFAULT_WINDOW, check_windows

        check_windows(self.stream_window, self.conn_buffer, self.conn_streams)
        if self.conn_buffer < self.stream_window:
            raise ValueError(f"conn_buffer {self.conn_buffer} below one message "
                             f"({self.stream_window}): a request could never complete")
        for name, b in (("bound", self.bound), ("unbound", self.unbound)):
            if min(b.connections, b.streams, b.handlers) < 1:
                raise ValueError(f"{name} budget {b} too small for one call")
            if b.buffered < min_buffered(b.connections, self):
                raise ValueError(f"{name} buffered budget {b.buffered} below "
                                 f"{b.connections} connections x {DEFAULT_WINDOW} + one message")
        if not 0 < self.unbound_cpu_per_uid <= 1 or not 0 < self.unbound_cpu <= 1:
            raise ValueError("unbound CPU shares must be in (0, 1]")
        for what in ("cpu_burst", "preface_timeout", "body_timeout", "idle_timeout", "send_timeout",
                     "sweep_interval"):
            if getattr(self, what) <= 0:
                raise ValueError(f"{what} must be positive")


def min_buffered(connections: int, limits: FrontLimits) -> int:
    """Every connection's initial window (it cannot be withheld) plus one whole message."""
    from badged.listener.http2 import DEFAULT_WINDOW

    return connections * DEFAULT_WINDOW + limits.stream_window


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force.

    systemd starts services with a soft limit of 1024 (hard 524288): left
    there, a few hundred idle connections make accept() fail for everyone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            _logger.warning("cannot raise the open-file limit", extra={"error": str(exc)})
    return int(soft) if soft != resource.RLIM_INFINITY else hard


def connection_cap(fd_limit: int, limits: FrontLimits) -> int:
    """Connections on both sockets together: below the fd limit, with room to spare."""
    cap = max(8, (fd_limit - FD_RESERVE) // FDS_PER_CONNECTION)
    return min(cap, limits.max_connections if limits.max_connections is not None
               else MAX_CONNECTIONS)


def could_match(policy: Policy, uid: int) -> bool:
    """Could some rule of ``policy`` match a caller running as ``uid``?

    Only uid and user selectors can exclude a uid without looking at the
    process; a rule that names neither could match any uid. Delegators count
    as rules: a user allowed to delegate is a legitimate caller.
    """
    mine = {f"unix:uid:{uid}"}
    try:
        mine.add(f"unix:user:{pwd.getpwuid(uid).pw_name}")
    except KeyError:
        pass
    for rule in policy.agents:
        named = {s for s in rule.selectors if s.startswith(("unix:uid:", "unix:user:"))}
        if not named or named <= mine:
            return True
    return any(not sel.startswith(("unix:uid:", "unix:user:")) or sel in mine
               for sel in policy.delegators)


class Classifier:
    """uid → bound (may match a rule) or not, cached per policy object."""

    def __init__(self, policy: Callable[[], Policy], always: frozenset[int]) -> None:
        self._policy = policy
        self._always = always
        self._for: Policy | None = None
        self._cache: dict[int, bool] = {}

    def __call__(self, uid: int) -> bool:
        if uid in self._always:
            return True
        policy = self._policy()
        if policy is not self._for:
            self._for = policy
            self._cache = {}
        known = self._cache.get(uid)
        if known is None:
            known = self._cache[uid] = could_match(policy, uid)
        return known


class CpuMeter:
    """Loop time a metered uid (or all of them together) may take: a token bucket in seconds.

    ``spend`` charges what a piece of work cost (measured with the monotonic
    ``perf_counter`` around it) and says how long the owner must wait until
    the bucket is positive again; 0 means it may go on. ``timer`` is the
    pending resume while the owner is held.
    """

    __slots__ = ("at", "burst", "rate", "timer", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now
        self.timer: object | None = None

    def spend(self, cost: float, now: float) -> float:
        tokens = self.tokens + (now - self.at) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        tokens -= cost
        self.tokens = tokens
        self.at = now
        return 0.0 if tokens >= 0.0 else -tokens / self.rate

    def full(self, now: float) -> bool:
        """Refilled to its burst (nothing to remember about its owner any more)."""
        return self.timer is None and self.tokens + (now - self.at) * self.rate >= self.burst


_C = TypeVar("_C")
_S = TypeVar("_S")


@dataclass(eq=False)
class UidUsage(Generic[_C, _S]):
    """What one uid holds now on one socket; insertion order is age (oldest first)."""

    budget: Budget
    connections: dict[_C, None] = field(default_factory=dict)
    streams: int = 0
    handlers: int = 0
    buffered: int = 0  # request bytes held now
    exposure: int = 0  # buffered + what the connections may still send; ≤ budget.buffered


class Ledger(Generic[_C, _S]):
    """Per-(channel, uid) usage, created on first connection and dropped with the last."""

    def __init__(self) -> None:
        self.usage: dict[tuple[str, int], UidUsage[_C, _S]] = {}
        self.channel_total: dict[str, int] = {}

    def get(self, channel: str, uid: int, budget: Budget) -> UidUsage[_C, _S]:
        key = (channel, uid)
        usage = self.usage.get(key)
        if usage is None:
            usage = self.usage[key] = UidUsage(budget)
        else:
            usage.budget = budget  # a policy reload may have changed the class
        return usage

    def drop_if_empty(self, channel: str, uid: int) -> None:
        usage = self.usage.get((channel, uid))
        if usage is not None and not usage.connections:
            del self.usage[(channel, uid)]

    def add(self, usage: UidUsage[_C, _S], channel: str, uid: int, conn: _C) -> None:
        # Making room may have evicted the uid's last connection and dropped its entry.
        self.usage.setdefault((channel, uid), usage)
        usage.connections[conn] = None
        self.channel_total[channel] = self.channel_total.get(channel, 0) + 1

    def remove(self, channel: str, uid: int, conn: _C) -> None:
        usage = self.usage.get((channel, uid))
        if usage is None or conn not in usage.connections:
            return
        del usage.connections[conn]
        self.channel_total[channel] -= 1
        if not usage.connections:
            del self.usage[(channel, uid)]

    def heaviest(self, channel: str) -> UidUsage[_C, _S] | None:
        """The uid with the most connections on ``channel`` (where to evict at the global cap)."""
        best: UidUsage[_C, _S] | None = None
        for (ch, _), usage in self.usage.items():
            if ch == channel and (best is None or len(usage.connections) > len(best.connections)):
                best = usage
        return best
