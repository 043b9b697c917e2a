"""Binding policy: which attested callers may act as which agent, for what.

Pure data and pure evaluation -- no I/O, no clock. Deny by default: a caller
gets nothing unless a binding names the agent, *all* of the binding's
selectors are among the caller's attested selectors, and the request fits the
binding's audiences, scopes, kinds and TTL cap.

Selectors follow SPIRE's unix workload attestor: ``unix:uid:1000``,
``unix:gid:1000``, ``unix:user:alice``, ``unix:group:agents``,
``unix:supplementary_gid:27``, ``unix:path:/usr/bin/python3``,
``unix:sha256:<hex>``.
"""

from __future__ import annotations

import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

SELECTOR_TYPES = ("uid", "gid", "user", "group", "supplementary_gid", "path", "sha256")
# token: FetchToken; sign: Sign; assertion: RFC 7523 client assertions and
# attestation-based client auth; dpop: RFC 9449 proofs; csr: attested CSRs.
KINDS = ("token", "sign", "assertion", "dpop", "csr")
_SELECTOR_RE = re.compile(r"^unix:(?P<type>[a-z_0-9]+):(?P<value>.+)$")


def parse_selector(text: str) -> tuple[str, str]:
    """Split and validate; ValueError with a reason a human can act on."""
    m = _SELECTOR_RE.match(text)
    if not m:
        raise ValueError(f"selector {text!r} is not of the form unix:<type>:<value>")
    kind, value = m.group("type"), m.group("value")
    if kind not in SELECTOR_TYPES:
        raise ValueError(f"unknown selector type {kind!r} (known: {', '.join(SELECTOR_TYPES)})")
    if kind in ("uid", "gid", "supplementary_gid") and not value.isdigit():
        raise ValueError(f"selector {text!r}: {kind} must be a number")
    if kind == "sha256" and not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"selector {text!r}: sha256 must be 64 lowercase hex digits")
    if kind == "path" and not value.startswith("/"):
        raise ValueError(f"selector {text!r}: path must be absolute")
    return kind, value


@dataclass(frozen=True)
class Binding:
    agent: str
    selectors: frozenset[str]
    audiences: frozenset[str]
    scopes: frozenset[str]
    kinds: frozenset[str]
    max_ttl: int
    source: str  # "policy.toml:12", for explanations

    def matches(self, caller: AbstractSet[str]) -> bool:
        return self.selectors <= caller


@dataclass(frozen=True)
class Policy:
    bindings: tuple[Binding, ...]
    source: str = "<empty>"

    @classmethod
    def empty(cls) -> Policy:
        return cls(bindings=())


@dataclass(frozen=True)
class Request:
    kind: str  # "token" | "sign"
    agent: str | None
    audience: str = ""
    scopes: tuple[str, ...] = ()
    ttl: int = 0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    agent: str | None
    rule: str
    reason: str
    ttl: int = 0


def candidates(policy: Policy, caller: AbstractSet[str]) -> list[Binding]:
    """Bindings whose selectors the caller satisfies (what ``whoami`` shows)."""
    return [b for b in policy.bindings if b.matches(caller)]


def missing_selectors(binding: Binding, caller: AbstractSet[str]) -> list[str]:
    return sorted(binding.selectors - caller)


def evaluate(policy: Policy, caller: AbstractSet[str], request: Request, *,
             default_ttl: int) -> Decision:
    """Decide one request. Every path returns the rule and a reason."""
    matching = candidates(policy, caller)
    if request.agent:
        matching = [b for b in matching if b.agent == request.agent]
        if not matching:
            return Decision(False, request.agent, "-",
                            f"no binding lets this caller act as agent {request.agent!r}")
    else:
        agents = sorted({b.agent for b in matching})
        if not agents:
            return Decision(False, None, "-", "no binding matches this caller")
        if len(agents) > 1:
            return Decision(False, None, "-",
                            f"caller may act as several agents ({', '.join(agents)}); name one")
    reasons: list[str] = []
    for b in matching:
        ttl = request.ttl or min(default_ttl, b.max_ttl)
        if request.kind not in b.kinds:
            reasons.append(f"{b.source}: kind {request.kind!r} not allowed")
            continue
        if request.kind == "token":
            if request.audience not in b.audiences:
                reasons.append(f"{b.source}: audience {request.audience!r} not allowed")
                continue
            extra = sorted(set(request.scopes) - b.scopes)
            if extra:
                reasons.append(f"{b.source}: scopes {extra} not allowed")
                continue
            if ttl > b.max_ttl:
                reasons.append(f"{b.source}: ttl {ttl}s above cap {b.max_ttl}s")
                continue
        return Decision(True, b.agent, b.source, "allowed", ttl)
    return Decision(False, matching[0].agent, matching[0].source, "; ".join(reasons))
