"""Policy: pure evaluation (table-driven, clock as a parameter) and file:line errors."""

from __future__ import annotations

import pytest

from badged.core.clock import FixedClock
from badged.errors import ConfigError
from badged.policy.loader import parse_duration, parse_policy, parse_rate
from badged.policy.model import Bundle, Decision, Delegation, Grant, Policy, Rate, Request, evaluate
from badged.policy.ratelimit import RateLimiter

POLICY = """
[baseline]
audiences = ["https://status"]
scopes = ["status:read"]
max_ttl = "5m"

[bundle.deploy]
audiences = ["https://api"]
scopes = ["read", "write"]
kinds = ["token", "sign"]
max_ttl = "10m"

[bundle.reader]
audiences = ["https://api"]
scopes = ["read"]
max_ttl = 60
rate = "2/1m"

[bundle.prod]
audiences = ["https://prod"]
scopes = ["prod:write"]
max_ttl = "5m"
approval = true

[[agent]]
name = "deploy-bot"
selectors = ["unix:uid:1000", "unix:path:/usr/bin/python3"]
bundles = ["deploy"]

[[agent]]
name = "reader"
selectors = ["unix:uid:1001"]
bundles = ["reader"]

[[agent]]
name = "svc"
selectors = ["systemd:unit:svc.service", "unix:uid:0"]

[delegation]
allow = ["unix:group:staff"]
"""

ALICE_PY = frozenset({"unix:uid:1000", "unix:gid:1000", "unix:path:/usr/bin/python3"})
ALICE_SH = frozenset({"unix:uid:1000", "unix:gid:1000", "unix:path:/bin/sh"})
BOB = frozenset({"unix:uid:1001", "unix:gid:1001"})
SVC = frozenset({"unix:uid:0", "systemd:unit:svc.service"})
SVC_OTHER_UNIT = frozenset({"unix:uid:0", "systemd:unit:other.service"})
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(POLICY, "policy.toml")


def decide(policy: Policy, caller: frozenset[str], req: Request, **kw: object) -> Decision:
    return evaluate(policy, caller, req, now=kw.pop("now", NOW), default_ttl=300, **kw)  # type: ignore[arg-type]


CASES = [
    # (name, caller, request, allowed, agent, bundle, ttl)
    ("agent bundle by uid+exe", ALICE_PY, Request("token", None, "https://api", ("read",)),
     True, "deploy-bot", "deploy", 300),
    ("baseline applies to every agent", ALICE_PY, Request("token", None, "https://status",
                                                          ("status:read",)),
     True, "deploy-bot", "baseline", 300),
    ("same uid other exe denied", ALICE_SH, Request("token", None, "https://api"),
     False, None, None, 0),
    ("unit selector matches", SVC, Request("token", None, "https://status"),
     True, "svc", "baseline", 300),
    ("other unit denied", SVC_OTHER_UNIT, Request("token", None, "https://status"),
     False, None, None, 0),
    ("unknown audience", ALICE_PY, Request("token", None, "https://evil"),
     False, "deploy-bot", None, 0),
    ("scopes must fit ONE bundle", ALICE_PY, Request("token", None, "https://api",
                                                     ("read", "status:read")),
     False, "deploy-bot", None, 0),
    ("scope outside bundle", BOB, Request("token", None, "https://api", ("write",)),
     False, "reader", None, 0),
    ("ttl above cap", BOB, Request("token", None, "https://api", (), 61),
     False, "reader", None, 0),
    ("ttl at cap", BOB, Request("token", None, "https://api", (), 60), True, "reader", "reader", 60),
    ("default ttl clamps to cap", BOB, Request("token", None, "https://api"),
     True, "reader", "reader", 60),
    ("named other agent", BOB, Request("token", "deploy-bot", "https://api"),
     False, "deploy-bot", None, 0),
    ("sign kind not granted", BOB, Request("sign", None), False, "reader", None, 0),
    ("sign kind granted", ALICE_PY, Request("sign", None), True, "deploy-bot", "deploy", 300),
    ("nobody", frozenset({"unix:uid:5"}), Request("token", None, "https://api"),
     False, None, None, 0),
]


@pytest.mark.parametrize(("name", "caller", "req", "allowed", "agent", "bundle", "ttl"), CASES,
                         ids=[c[0] for c in CASES])
def test_evaluate(policy: Policy, name: str, caller: frozenset[str], req: Request, allowed: bool,
                  agent: str | None, bundle: str | None, ttl: int) -> None:
    d = decide(policy, caller, req)
    assert d.allowed is allowed, d.reason
    assert d.agent == agent
    assert d.bundle == bundle
    if allowed:
        assert d.ttl == ttl
        assert d.rule.startswith("policy.toml:")
    else:
        assert d.reason


def test_empty_policy_grants_nothing() -> None:
    d = decide(Policy.empty(), ALICE_PY, Request("token", None, "https://api"))
    assert not d.allowed


def test_several_agents_must_be_named() -> None:
    text = POLICY + '\n[[agent]]\nname = "other"\nselectors = ["unix:uid:1000"]\n'
    pol = parse_policy(text, "p.toml")
    d = decide(pol, ALICE_PY, Request("token", None, "https://api"))
    assert not d.allowed and "several agents" in d.reason
    assert decide(pol, ALICE_PY, Request("token", "deploy-bot", "https://api")).allowed


# -- step-ups -------------------------------------------------------------------------


def _grant(agent: str, bundle: str, start: float, minutes: int, revoked: bool = False) -> Grant:
    return Grant(id="g-1", agent=agent, bundle=bundle, created_at=start,
                 expires_at=start + minutes * 60, reason="incident", granted_by="root",
                 revoked=revoked)


STEPUP = [
    ("no grant: denied", [], NOW, False),
    ("active grant: allowed, needs approval", [_grant("reader", "prod", NOW - 60, 30)], NOW, True),
    ("expired grant", [_grant("reader", "prod", NOW - 3600, 30)], NOW, False),
    ("expires exactly now", [_grant("reader", "prod", NOW - 1800, 30)], NOW, False),
    ("not yet valid (clock jumped back)", [_grant("reader", "prod", NOW + 60, 30)], NOW, False),
    ("revoked early", [_grant("reader", "prod", NOW - 60, 30, revoked=True)], NOW, False),
    ("grant for another agent", [_grant("deploy-bot", "prod", NOW - 60, 30)], NOW, False),
]


@pytest.mark.parametrize(("name", "grants", "now", "allowed"), STEPUP, ids=[s[0] for s in STEPUP])
def test_step_up_grants(policy: Policy, name: str, grants: list[Grant], now: float,
                        allowed: bool) -> None:
    d = decide(policy, BOB, Request("token", None, "https://prod", ("prod:write",)),
               grants=grants, now=now)
    assert d.allowed is allowed, d.trace
    if allowed:
        assert d.bundle == "prod" and d.approval_required
        assert "step-up grant g-1" in d.rule


# -- delegation ---------------------------------------------------------------------------


def _delegation(agent: str = "deploy-bot", scopes: tuple[str, ...] = ("read",),
                audiences: tuple[str, ...] = ("https://api",), **kw: object) -> Delegation:
    base: dict[str, object] = dict(id="d-1", user="alice", uid=1000, agent=agent,
                                   audiences=frozenset(audiences), scopes=frozenset(scopes),
                                   created_at=NOW - 10, expires_at=NOW + 3600)
    base.update(kw)
    return Delegation(**base)  # type: ignore[arg-type]


DELEG = [
    ("within delegation and bundle", _delegation(), ("read",), "https://api", True),
    ("scope outside delegation", _delegation(), ("write",), "https://api", False),
    ("delegation wider than agent: intersection",
     _delegation(scopes=("read", "admin")), ("admin",), "https://api", False),
    ("audience outside delegation", _delegation(), ("read",), "https://status", False),
    ("given to another agent", _delegation(agent="reader"), ("read",), "https://api", False),
    ("expired", _delegation(expires_at=NOW - 1), ("read",), "https://api", False),
    ("revoked", _delegation(revoked=True), ("read",), "https://api", False),
]


@pytest.mark.parametrize(("name", "deleg", "scopes", "aud", "allowed"), DELEG,
                         ids=[c[0] for c in DELEG])
def test_delegation(policy: Policy, name: str, deleg: Delegation, scopes: tuple[str, ...],
                    aud: str, allowed: bool) -> None:
    req = Request("token", None, aud, scopes, delegation="d-1")
    d = decide(policy, ALICE_PY, req, delegations={"d-1": deleg})
    assert d.allowed is allowed, d.reason
    if allowed:
        assert d.delegation is deleg
        assert d.ttl <= 300


def test_unknown_delegation_id_reveals_nothing(policy: Policy) -> None:
    req = Request("token", None, "https://api", ("read",), delegation="d-nope")
    other = decide(policy, ALICE_PY, Request("token", None, "https://api", ("read",),
                                             delegation="d-1"),
                   delegations={"d-1": _delegation(agent="reader")})
    unknown = decide(policy, ALICE_PY, req, delegations={})
    assert unknown.reason == other.reason == "no such active delegation for this agent"


def test_delegated_ttl_never_outlives_delegation(policy: Policy) -> None:
    deleg = _delegation(expires_at=NOW + 42)
    d = decide(policy, ALICE_PY, Request("token", None, "https://api", ("read",),
                                         delegation="d-1"), delegations={"d-1": deleg})
    assert d.allowed and d.ttl == 42


# -- rate budgets ------------------------------------------------------------------------


def test_rate_budget_exhausts_and_refills(policy: Policy) -> None:
    wall, mono = FixedClock(NOW), FixedClock(1000.0)
    limiter = RateLimiter(mono)
    reader = policy.bundles["reader"]
    req = Request("token", None, "https://api", ("read",))

    def attempt() -> Decision:
        d = decide(policy, BOB, req, now=wall(),
                   budget=lambda agent, bundle: limiter.wait_time(agent, bundle))
        if d.allowed:
            limiter.consume("reader", reader)
        return d

    assert attempt().allowed and attempt().allowed
    denied = attempt()
    assert not denied.allowed and denied.retry_after is not None
    assert 0 < denied.retry_after <= 30
    # Wall-clock steps either way change nothing: the buckets run on the
    # monotonic clock (issue 15: -1 h kept a budget empty for 18 s).
    wall.advance(-3600)
    assert not attempt().allowed
    wall.advance(7200)
    assert not attempt().allowed
    mono.advance(31)
    assert attempt().allowed


def test_budget_is_per_agent_and_bundle() -> None:
    limiter = RateLimiter(FixedClock(NOW))
    b = Bundle("b", frozenset({"a"}), frozenset(), frozenset({"token"}), 60, Rate(1, 60))
    limiter.consume("x", b)
    assert limiter.wait_time("x", b) is not None
    assert limiter.wait_time("y", b) is None


# -- loader errors ------------------------------------------------------------------------

BAD = [
    ("unknown selector type", '[[agent]]\nname = "a"\nselectors = ["unix:pid:1"]\nbundles = ["b"]',
     4, "unknown selector type"),
    ("unknown namespace", '[[agent]]\nname = "a"\nselectors = ["kube:ns:x"]\nbundles = ["b"]',
     4, "unknown selector namespace"),
    ("non-numeric uid", '[[agent]]\nname = "a"\nselectors = ["unix:uid:root"]\nbundles = ["b"]',
     4, "must be a number"),
    ("no selectors", '[[agent]]\nname = "a"\nselectors = []\nbundles = ["b"]', 4,
     "must not be empty"),
    ("unknown bundle", '[[agent]]\nname = "a"\nselectors = ["unix:uid:1"]\nbundles = ["nope"]',
     5, "unknown bundle 'nope'"),
    ("agent granted nothing", '[[agent]]\nname = "a"\nselectors = ["unix:uid:1"]', 2,
     "grants nothing"),
    ("negative ttl", '[bundle.x]\naudiences = ["a"]\nmax_ttl = -5', 4, "must be positive"),
    ("huge ttl", '[bundle.x]\naudiences = ["a"]\nmax_ttl = "1000h"', 4, "hard cap"),
    ("bundle names nothing", '[bundle.x]\nkinds = ["token"]', 2, "bundle names nothing"),
    ("unknown kind", '[bundle.x]\naudiences = ["a"]\nkinds = ["mint"]', 4, "unknown kinds"),
    ("bad rate", '[bundle.x]\naudiences = ["a"]\nrate = "lots"', 4, "rate"),
    ("approval not bool", '[bundle.x]\naudiences = ["a"]\napproval = "yes"', 4, "true or false"),
    ("unknown bundle key", '[bundle.x]\naudiences = ["a"]\nallow_all = true', 4, "allow_all"),
    ("unknown table", '[superuser]\nx = 1', 2, "unknown top-level table"),
    ("bundle listed twice",
     '[[agent]]\nname = "a"\nselectors = ["unix:uid:1"]\nbundles = ["b", "b"]', 5, "twice"),
    ("contradictory rules: same selectors, two agents",
     '[[agent]]\nname = "a"\nselectors = ["unix:uid:1"]\nbundles = ["b"]\n'
     '[[agent]]\nname = "z"\nselectors = ["unix:uid:1"]\nbundles = ["b"]', 8, "ambiguous"),
]


@pytest.mark.parametrize(("name", "body", "line", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_policy_reports_file_and_line(name: str, body: str, line: int, message: str) -> None:
    text = "# policy\n" + body + '\n\n[bundle.b]\naudiences = ["x"]\n'
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "/etc/badged/policy.toml")
    assert info.value.path == "/etc/badged/policy.toml"
    assert info.value.line == line, str(info.value)
    assert message in str(info.value)


def test_toml_syntax_error_has_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy("[bundle.x]\naudiences = \n", "p.toml")
    assert info.value.line == 2


def test_bind_shorthand_still_loads() -> None:
    pol = parse_policy('[[bind]]\nagent = "a"\nselectors = ["unix:uid:1"]\naudiences = ["x"]\n',
                       "p.toml")
    d = evaluate(pol, frozenset({"unix:uid:1"}), Request("token", None, "x"), now=NOW,
                 default_ttl=300)
    assert d.allowed and d.agent == "a"


@pytest.mark.parametrize(("text", "seconds"), [(300, 300), ("90s", 90), ("5m", 300), ("1h", 3600)])
def test_durations(text: object, seconds: int) -> None:
    assert parse_duration(text, what="t") == seconds


@pytest.mark.parametrize(("text", "rate"), [("30/1m", Rate(30, 60)), ("5/h", Rate(5, 3600)),
                                            ("100/60s", Rate(100, 60))])
def test_rates(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


def test_daemon_hard_cap_beats_bundle_cap(policy: Policy) -> None:
    """A bundle may say 1h; a daemon capped at 120 s never mints beyond it."""
    req = Request("token", None, "https://api", ("read",))
    d = evaluate(policy, ALICE_PY, req, now=NOW, default_ttl=300, max_ttl=120)
    assert d.allowed and d.ttl == 120
    long = Request("token", None, "https://api", ("read",), ttl=600)
    d = evaluate(policy, ALICE_PY, long, now=NOW, default_ttl=300, max_ttl=120)
    assert not d.allowed and "daemon's max_ttl" in d.reason
