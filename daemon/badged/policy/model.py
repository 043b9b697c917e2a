"""Least-agency policy: which attested callers may obtain which credential.

Pure data and pure evaluation -- no I/O; the time, the step-up grants, the
delegations and the rate budget are all arguments, so every rule is tested
with plain tables (tests/unit/test_policy*.py).

The model (docs/policy.example.toml):

* **Agents** are bound to kernel-attested *selectors* (all must match) and to
  named **bundles**.
* A **bundle** is a reusable set of what may be obtained: audiences, scopes,
  credential kinds, a TTL cap, a rate budget, and whether a human must
  approve.
* The **baseline** bundle applies to every agent (the workspace scope).
* **Step-up grants** add a bundle to one agent until a deadline.
* A **delegation** lets an agent act for a user; the result never exceeds the
  intersection of the delegation and the agent's own bundles.

A request is allowed when a bundle in effect allows all of it (kind,
audience, every scope, TTL) and still has budget. When several bundles allow
it, the **strictest** one decides (``strictest``: approval first, then the
lowest rate): a bundle's ``approval`` or ``rate`` cannot be bypassed through
another bundle -- the baseline, a step-up -- that happens to allow the same
request. This matters most for ``sign`` and ``csr``, which carry no audience
or scope, so every bundle with the kind allows every such request; the loader
also refuses policies where an agent's own bundles (with the baseline) allow
``sign``/``csr`` under different gates, since the author cannot have meant
both. Deny by default: no matching agent, no bundle, or an empty policy
grants nothing. Every decision carries the rule that made it and a trace of
why the others did not.

A caller that matches an agent rule is that agent, not a person: it may not
create delegations (``delegation_refusal``) unless the policy says this is a
single-user box (``[delegation] agents_may_delegate = true``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from badged.core.context import Context, satisfies
from badged.proxy.paths import matches

# token: FetchToken; sign: Sign; assertion: RFC 7523 client assertions and
# attestation-based client auth; dpop: RFC 9449 proofs; csr: attested CSRs;
# ssh: signatures on the SSH agent socket (badged.sshagent), narrowed by the
# bundle's ssh_namespaces (SSHSIG), ssh_hosts and ssh_users (user auth);
# proxy: one HTTP call through the credential proxy (badged.proxy), narrowed
# by the bundle's proxy entries (route, methods, path patterns).
KINDS = ("token", "sign", "assertion", "dpop", "csr", "ssh", "proxy")
# Kinds without audience or scope: any bundle with the kind allows any such request.
UNSCOPED_KINDS = ("sign", "csr")

# Selectors that bind to *what runs* (binary, unit, container, cgroup,
# ancestry) rather than to *who runs it*. Alone, any local user who can run
# that binary -- or name a cgroup so -- would be the agent (issue 13), so the
# loader wants one of USER_SELECTORS beside them unless a rule opts out.
BINDING_SELECTORS = frozenset({"unix:path", "unix:sha256", "unix:parent_path",
                               "unix:ancestor_path", "unix:cgroup", "systemd:unit",
                               "container:id"})
USER_SELECTORS = frozenset({"unix:uid", "unix:user", "unix:gid", "unix:group",
                            "unix:supplementary_gid"})
# What the attestor emits instead of unix:path for a caller in another mount
# namespace (badged.attest.process.OTHER_NS_PATH); not nameable in a policy.
OTHER_NS_PATH = "unix:path_other_mount_ns:"

SELECTOR_TYPES: Mapping[str, tuple[str, ...]] = {
    "unix": ("uid", "gid", "user", "group", "supplementary_gid", "path", "sha256",
             "parent_path", "ancestor_path", "cgroup"),
    "systemd": ("unit",),
    "container": ("id",),
}
_SELECTOR_RE = re.compile(r"^(?P<ns>[a-z]+):(?P<type>[a-z_0-9]+):(?P<value>.+)$")


def parse_selector(text: str) -> tuple[str, str]:
    """Split and validate; ValueError with a reason a human can act on."""
    m = _SELECTOR_RE.match(text)
    if not m:
        raise ValueError(f"selector {text!r} is not of the form <ns>:<type>:<value>")
    ns, kind, value = m.group("ns"), m.group("type"), m.group("value")
    if ns not in SELECTOR_TYPES:
        raise ValueError(f"unknown selector namespace {ns!r} (known: {', '.join(SELECTOR_TYPES)})")
    if kind not in SELECTOR_TYPES[ns]:
        raise ValueError(f"unknown selector type {kind!r} for {ns} "
                         f"(known: {', '.join(SELECTOR_TYPES[ns])})")
    if kind in ("uid", "gid", "supplementary_gid") and not value.isdigit():
        raise ValueError(f"selector {text!r}: {kind} must be a number")
    if kind == "sha256" and not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"selector {text!r}: sha256 must be 64 lowercase hex digits")
    if kind in ("path", "parent_path", "ancestor_path", "cgroup") and not value.startswith("/"):
        raise ValueError(f"selector {text!r}: {kind} must be absolute")
    return f"{ns}:{kind}", value


@dataclass(frozen=True)
class Rate:
    """``count`` credentials per ``window`` seconds (a token bucket)."""

    count: int
    window: int

    def __str__(self) -> str:
        return f"{self.count}/{self.window}s"


@dataclass(frozen=True)
class Route:
    """A credential-proxy route (``[route.NAME]``, docs/proxy.md): where calls go
    and which credential badged attaches. The agent never sees the credential."""

    name: str
    upstream: str  # https://host[:port][/base], no query, no userinfo
    credential: str  # "bearer" | "dpop" | "secret" | "oauth"
    audience: str = ""  # bearer/dpop: the token's aud (default: the upstream origin)
    scopes: tuple[str, ...] = ()
    secret: str = ""  # credential "secret": the stored secret's name
    header: str = "Authorization"  # credential "secret": the header that carries it
    prefix: str = ""  # credential "secret": put before the value ("Bearer ")
    ca_file: str | None = None  # None: the system trust store
    max_request_bytes: int = 1 << 20
    rate: Rate | None = None  # per agent, on this route
    timeout: int = 30
    # credential "oauth": the authorization server's token endpoint (client
    # credentials with badged's RFC 7523 client assertion) and the client id
    # to assert ("": the agent's SPIFFE ID; else one the policy lists for it).
    token_endpoint: str = ""
    client_id: str = ""
    source: str = ""


@dataclass(frozen=True)
class ProxyAllow:
    """One bundle entry: this route, these methods, these normalized paths."""

    route: str
    methods: frozenset[str]
    paths: tuple[tuple[str, ...], ...]  # checked patterns (badged.proxy.paths)

    def allows(self, req: Request) -> bool:
        return (req.proxy_route == self.route and req.proxy_method in self.methods
                and any(matches(p, req.proxy_segments) for p in self.paths))


@dataclass(frozen=True)
class Bundle:
    name: str
    audiences: frozenset[str]
    scopes: frozenset[str]
    kinds: frozenset[str]
    max_ttl: int
    rate: Rate | None = None
    approval: bool = False
    source: str = ""
    # kind "ssh": SSHSIG namespaces allowed (none: no SSHSIG at all); for user
    # auth, destination host key fingerprints ("SHA256:...") and server user
    # names (empty: any).
    ssh_namespaces: frozenset[str] = frozenset()
    ssh_hosts: frozenset[str] = frozenset()
    ssh_users: frozenset[str] = frozenset()
    # Principals an operator-issued SSH certificate for an agent bound to this
    # bundle names (badgectl ssh cert; none: no certificate from this bundle).
    ssh_principals: frozenset[str] = frozenset()
    # kind "proxy": the routes, methods and paths allowed (none: no call).
    proxy: tuple[ProxyAllow, ...] = ()
    # Request context this bundle is limited to (issue 21): for each key, the
    # values allowed; a request lacking the key, or with another value, misses.
    context: tuple[tuple[str, frozenset[str]], ...] = ()

    def miss(self, req: Request, ttl: int, hard_cap: int | None = None) -> str | None:
        """Why this bundle does not allow ``req`` (None: it does)."""
        if req.kind not in self.kinds:
            return f"kind {req.kind!r} not in bundle"
        if req.kind in ("token", "assertion", "dpop") and req.audience not in self.audiences:
            return f"audience {req.audience!r} not in bundle"
        if req.kind == "ssh":
            ssh_miss = self._ssh_miss(req)
            if ssh_miss is not None:
                return ssh_miss
        if req.kind == "proxy" and not any(a.allows(req) for a in self.proxy):
            return (f"{req.proxy_method} {req.proxy_path!r} on route {req.proxy_route!r} "
                    f"not in bundle")
        if not self.scopes.issuperset(req.scopes):
            return f"scopes {sorted(set(req.scopes) - self.scopes)} not in bundle"
        if ttl > self.max_ttl:
            return f"ttl {ttl}s above bundle cap {self.max_ttl}s"
        if hard_cap is not None and ttl > hard_cap:
            return f"ttl {ttl}s above the daemon's max_ttl {hard_cap}s"
        if self.context:
            have = dict(req.context)
            for key, allowed in self.context:
                if have.get(key) not in allowed:
                    return f"context {key}={have.get(key, '')!r} outside the bundle's context"
        return None


    def _ssh_miss(self, req: Request) -> str | None:
        """What the SSH agent could see of the signature and this bundle refuses.

        Deny by default: a request the agent could not classify
        (``ssh_purpose`` empty) matches no bundle; a destination restriction
        refuses user auth whose host key the client did not bind
        (``session-bind@openssh.com``).
        """
        if req.ssh_purpose == "sshsig":
            if req.ssh_namespace not in self.ssh_namespaces:
                return f"SSHSIG namespace {req.ssh_namespace!r} not in bundle"
            return None
        if req.ssh_purpose != "auth":
            return "unclassified SSH signature request"
        if self.ssh_users and req.ssh_user not in self.ssh_users:
            return f"SSH user {req.ssh_user!r} not in bundle"
        if self.ssh_hosts and req.ssh_host not in self.ssh_hosts:
            return (f"destination host key {req.ssh_host!r} not in bundle" if req.ssh_host
                    else "destination host key unknown (no session-bind) and bundle names hosts")
        return None


@dataclass(frozen=True)
class AgentRule:
    agent: str
    selectors: frozenset[str]
    bundles: tuple[str, ...]
    source: str
    # Loaded with a warning: binds by binary/unit/container without a user.
    allow_any_user: bool = False
    # unix:path also matches callers in another mount namespace (the daemon
    # still requires the very file it finds at that path: same dev/inode).
    other_mount_ns: bool = False
    # OAuth client ids (besides the agent's own SPIFFE ID) that a client
    # assertion or attestation may name for this agent: the operator's word,
    # never the request's (docs/credentials.md, "Which client_id").
    client_ids: frozenset[str] = frozenset()
    # The selectors with unix:path: spelled as the attestor spells it for a
    # caller in another mount namespace; None unless other_mount_ns.
    foreign: frozenset[str] | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if self.other_mount_ns:
            object.__setattr__(self, "foreign", frozenset(
                OTHER_NS_PATH + s[len("unix:path:"):] if s.startswith("unix:path:") else s
                for s in self.selectors))

    def matches(self, caller: AbstractSet[str]) -> bool:
        if self.selectors <= caller:
            return True
        return self.foreign is not None and self.foreign <= caller


@dataclass(frozen=True)
class Policy:
    agents: tuple[AgentRule, ...]
    bundles: Mapping[str, Bundle] = field(default_factory=dict)
    baseline: Bundle | None = None
    delegators: frozenset[str] = frozenset()  # selectors; any one lets a user delegate
    delegators_source: str = ""
    source: str = "<empty>"
    # [route.NAME]: credential-proxy routes (badged.proxy).
    routes: Mapping[str, Route] = field(default_factory=dict)
    # Single-user dev box switches (both off unless the policy says so):
    # a caller matching an agent rule may still delegate; the uid that
    # requested an approval may approve it.
    agents_may_delegate: bool = False
    requester_may_approve: bool = False
    # Loaded, but worth an operator's look (allow_any_user rules).
    warnings: tuple[str, ...] = ()
    # Built once per policy (issue 22): a request's cost must not depend on
    # rules that cannot apply to it. Rules by agent name, and rules by their
    # rarest selector (a rule matches only callers that have it), each with
    # its position so results keep the policy's order.
    _by_agent: Mapping[str, tuple[AgentRule, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False)
    _by_selector: Mapping[str, tuple[tuple[int, AgentRule], ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False)
    _unkeyed: tuple[tuple[int, AgentRule], ...] = field(
        default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        by_agent: dict[str, list[AgentRule]] = {}
        count: dict[str, int] = {}
        for rule in self.agents:
            by_agent.setdefault(rule.agent, []).append(rule)
            for sel in rule.selectors | (rule.foreign or frozenset()):
                count[sel] = count.get(sel, 0) + 1
        by_sel: dict[str, list[tuple[int, AgentRule]]] = {}
        unkeyed: list[tuple[int, AgentRule]] = []
        for pos, rule in enumerate(self.agents):
            keys = {min(sels, key=lambda x: (count[x], x))
                    for sels in (rule.selectors, rule.foreign) if sels}
            if not keys or not rule.selectors:
                unkeyed.append((pos, rule))  # no selector: matches every caller
                continue
            for key in keys:  # the foreign spelling may hold the rarest one elsewhere
                by_sel.setdefault(key, []).append((pos, rule))
        object.__setattr__(self, "_by_agent", {k: tuple(v) for k, v in by_agent.items()})
        object.__setattr__(self, "_by_selector", {k: tuple(v) for k, v in by_sel.items()})
        object.__setattr__(self, "_unkeyed", tuple(unkeyed))

    def rules_for_agent(self, agent: str) -> tuple[AgentRule, ...]:
        """This agent's rules, in policy order."""
        return self._by_agent.get(agent, ())

    def matching(self, caller: AbstractSet[str]) -> list[AgentRule]:
        """Rules whose selectors ``caller`` satisfies, in policy order.

        Looks only at rules keyed by one of the caller's own selectors, so
        the cost grows with the rules that could apply, not with the policy.
        """
        hits: dict[int, AgentRule] = dict(self._unkeyed)
        index = self._by_selector
        for sel in caller:
            for pos, rule in index.get(sel, ()):
                hits[pos] = rule
        return [rule for _, rule in sorted(hits.items()) if rule.matches(caller)]

    @classmethod
    def empty(cls) -> Policy:
        return cls(agents=())


@dataclass(frozen=True)
class Grant:
    """A step-up: ``bundle`` added to ``agent`` until ``expires_at``."""

    id: str
    agent: str
    bundle: str
    created_at: float
    expires_at: float
    reason: str
    granted_by: str
    revoked: bool = False
    # Applies only to requests whose context carries all of these pairs
    # (``badgectl grant … --context channel=#deploy``); () = any context.
    context: Context = ()

    def active(self, now: float) -> bool:
        return not self.revoked and self.created_at <= now < self.expires_at


@dataclass(frozen=True)
class Delegation:
    """User ``user`` (attested uid ``uid``) lets ``agent`` act for them."""

    id: str
    user: str
    uid: int
    agent: str
    audiences: frozenset[str]
    scopes: frozenset[str]
    created_at: float
    expires_at: float
    reason: str = ""
    revoked: bool = False

    def active(self, now: float) -> bool:
        return not self.revoked and self.created_at <= now < self.expires_at


@dataclass(frozen=True)
class Request:
    kind: str
    agent: str | None
    audience: str = ""
    scopes: tuple[str, ...] = ()
    ttl: int = 0
    delegation: str | None = None
    # kind "ssh" only: "auth" | "sshsig" | "" (unclassified), and what the
    # agent protocol showed of it.
    ssh_purpose: str = ""
    ssh_namespace: str = ""
    ssh_host: str = ""
    ssh_user: str = ""
    # kind "proxy" only: the route, the method and the normalized path.
    proxy_route: str = ""
    proxy_method: str = ""
    proxy_segments: tuple[str, ...] = ()
    proxy_path: str = ""
    # What the agent says it is working on (badged.core.context): asserted,
    # not attested; narrows context-scoped bundles and grants.
    context: Context = ()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    agent: str | None
    rule: str
    reason: str
    ttl: int = 0
    bundle: str | None = None
    approval_required: bool = False
    retry_after: float | None = None  # set when denied only for lack of budget
    delegation: Delegation | None = None
    trace: tuple[str, ...] = ()
    grant: str | None = None  # the step-up grant whose bundle decided, if one did

    def explain(self) -> str:
        head = "ALLOW" if self.allowed else "DENY"
        return f"{head} agent={self.agent} rule={self.rule} bundle={self.bundle}: {self.reason}"


# Returns seconds until budget is available again, or None if there is budget.
BudgetCheck = Callable[[str, Bundle], float | None]


def _no_budget_limit(agent: str, bundle: Bundle) -> float | None:
    return None


def candidates(policy: Policy, caller: AbstractSet[str]) -> list[AgentRule]:
    """Agent rules whose selectors the caller satisfies (what ``whoami`` shows)."""
    return policy.matching(caller)


def missing_selectors(rule: AgentRule, caller: AbstractSet[str]) -> list[str]:
    return sorted(rule.selectors - caller)


def bundles_in_effect(policy: Policy, rule: AgentRule, grants: Sequence[Grant],
                      now: float) -> list[tuple[Bundle, str]]:
    """(bundle, why it applies), in evaluation order: baseline, agent, step-ups
    (context-scoped step-ups included, their context named in ``why``)."""
    return [(b, why) for b, why, _ in _in_effect(policy, rule, grants, now, None)]


def _in_effect(policy: Policy, rule: AgentRule, grants: Sequence[Grant],
               now: float, context: Context | None = ()) -> list[tuple[Bundle, str, str | None]]:
    """``context``: the request's; a context-scoped grant applies only when it
    carries the grant's pairs (None: list them all, for ``whoami``)."""
    out: list[tuple[Bundle, str, str | None]] = []
    if policy.baseline is not None:
        out.append((policy.baseline, f"baseline ({policy.baseline.source})", None))
    for name in rule.bundles:
        b = policy.bundles.get(name)
        if b is not None:
            out.append((b, f"bundle {name}", None))
    for g in grants:
        if g.agent == rule.agent and g.active(now):
            if g.context and context is not None and not satisfies(g.context, context):
                continue
            b = policy.bundles.get(g.bundle)
            if b is not None:
                where = ("" if not g.context else
                         " in context " + ",".join(f"{k}={v}" for k, v in g.context))
                out.append((b, f"step-up grant {g.id}{where} until {int(g.expires_at)}", g.id))
    return out


def strictness(bundle: Bundle) -> tuple[int, int, float]:
    """Sort key, strictest first: approval, then rate-limited, then the lowest rate."""
    rate = bundle.rate
    return (0 if bundle.approval else 1, 0 if rate is not None else 1,
            rate.count / rate.window if rate is not None else 0.0)


def delegation_refusal(policy: Policy, caller: AbstractSet[str]) -> str | None:
    """Why this caller may not create a delegation (None: it may).

    A delegation lets an agent act for a *person*; a process that is itself
    an agent (matches any agent rule) creating one would mint ``sub=user
    act=agent`` for itself without the person ever being asked.
    """
    if not policy.delegators & caller:
        return "caller matches no [delegation] allow selector"
    if not policy.agents_may_delegate:
        agents = sorted({r.agent for r in policy.matching(caller)})
        if agents:
            return f"caller matches agent rule(s) for {', '.join(agents)}: agents may not delegate"
    return None


def may_delegate(policy: Policy, caller: AbstractSet[str]) -> bool:
    return delegation_refusal(policy, caller) is None


def evaluate(
    policy: Policy,
    caller: AbstractSet[str],
    request: Request,
    *,
    now: float,
    default_ttl: int,
    max_ttl: int | None = None,
    grants: Sequence[Grant] = (),
    delegations: Mapping[str, Delegation] | None = None,
    budget: BudgetCheck = _no_budget_limit,
) -> Decision:
    """Decide one request; never raises for a policy reason.

    ``max_ttl`` is the daemon's hard cap, above any bundle's: key publication
    windows (rotation, session keys) are sized by it, so no token may outlive it.
    """
    trace: list[str] = []
    if request.agent:
        # Same rules, same order as filtering candidates(): the cheap name
        # test first, the selector subset test only for this agent's rules.
        wanted = request.agent
        mine = policy.rules_for_agent(wanted)
        matching = [r for r in mine if r.matches(caller)]
        if not matching:
            return Decision(False, request.agent, "-",
                            f"no agent rule lets this caller act as {request.agent!r}",
                            trace=tuple(f"{r.source}: missing {missing_selectors(r, caller)}"
                                        for r in mine))
    else:
        matching = candidates(policy, caller)
        names = sorted({r.agent for r in matching})
        if not names:
            return Decision(False, None, "-", "no agent rule matches this caller")
        if len(names) > 1:
            return Decision(False, None, "-",
                            f"caller may act as several agents ({', '.join(names)}); name one")
    agent = matching[0].agent

    delegation: Delegation | None = None
    if request.delegation:
        delegation = (delegations or {}).get(request.delegation)
        # One answer for "unknown", "someone else's", "expired", "revoked":
        # an agent learns nothing about grants it was not given.
        if delegation is None or delegation.agent != agent or not delegation.active(now):
            return Decision(False, agent, "-", "no such active delegation for this agent")
        if delegation.audiences and request.audience not in delegation.audiences:
            return Decision(False, agent, f"delegation {delegation.id}",
                            f"audience {request.audience!r} outside the delegation")
        outside = sorted(set(request.scopes) - delegation.scopes)
        if outside:
            return Decision(False, agent, f"delegation {delegation.id}",
                            f"scopes {outside} outside the delegation")

    # Every bundle that allows the request, then the strictest of them
    # decides: its approval and its budget apply, whatever else also allows.
    allowing: list[tuple[Bundle, str, str | None, AgentRule, int]] = []
    for rule in matching:
        for bundle, why, grant in _in_effect(policy, rule, grants, now, request.context):
            cap = bundle.max_ttl if max_ttl is None else min(bundle.max_ttl, max_ttl)
            ttl = request.ttl or min(default_ttl, cap)
            if delegation is not None:
                ttl = min(ttl, max(1, int(delegation.expires_at - now)))
            miss = bundle.miss(request, ttl, max_ttl)
            if miss is not None:
                trace.append(f"{why}: {miss}")
                continue
            trace.append(f"{why}: allows")
            allowing.append((bundle, why, grant, rule, ttl))
    if allowing:
        bundle, why, grant, rule, ttl = min(allowing, key=lambda a: strictness(a[0]))
        if len(allowing) > 1:
            trace.append(f"{why}: strictest of {len(allowing)} allowing bundles, decides")
        wait = budget(agent, bundle) if bundle.rate is not None else None
        if wait is not None:
            trace.append(f"{why}: rate budget {bundle.rate} exhausted")
            return Decision(False, agent, rule.source, "rate budget exhausted",
                            bundle=bundle.name, retry_after=wait, trace=tuple(trace))
        return Decision(True, agent, f"{rule.source} via {why}", "allowed", ttl,
                        bundle=bundle.name, approval_required=bundle.approval,
                        delegation=delegation, trace=tuple(trace), grant=grant)
    # For the operator (audit, explain), never the caller: a step-up that
    # would apply in another context. Telling the agent would coach a
    # prompt-injected one into claiming that context.
    for g in grants:
        if g.agent == agent and g.context and g.active(now) \
                and not satisfies(g.context, request.context):
            said = ",".join(f"{k}={v}" for k, v in request.context) or "no context"
            trace.append(f"step-up grant {g.id}: only in context "
                         f"{','.join(f'{k}={v}' for k, v in g.context)}; the request says {said}")
    if not trace:
        trace.append(f"{matching[0].source}: no bundle in effect")
    return Decision(False, agent, matching[0].source, "; ".join(trace), trace=tuple(trace))
