"""Binding policy: pure evaluation (table-driven) and file:line errors."""

from __future__ import annotations

import pytest

from badged.errors import ConfigError
from badged.policy.loader import parse_duration, parse_policy
from badged.policy.model import Policy, Request, evaluate

POLICY = """
[[bind]]
agent = "deploy-bot"
selectors = ["unix:uid:1000", "unix:path:/usr/bin/python3"]
audiences = ["https://api"]
scopes = ["read", "write"]
kinds = ["token", "sign"]
max_ttl = "10m"

[[bind]]
agent = "reader"
selectors = ["unix:uid:1001"]
audiences = ["https://api"]
scopes = ["read"]
max_ttl = 60
"""

ALICE_PY = frozenset({"unix:uid:1000", "unix:gid:1000", "unix:path:/usr/bin/python3"})
ALICE_SH = frozenset({"unix:uid:1000", "unix:gid:1000", "unix:path:/bin/sh"})
BOB = frozenset({"unix:uid:1001", "unix:gid:1001"})


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(POLICY, "policy.toml")


CASES = [
    # (name, caller, request, allowed, agent, ttl)
    ("match by uid+exe", ALICE_PY, Request("token", None, "https://api", ("read",), 0), True,
     "deploy-bot", 300),
    ("same uid other exe denied", ALICE_SH, Request("token", None, "https://api", (), 0), False,
     None, 0),
    ("unknown audience", ALICE_PY, Request("token", None, "https://evil", (), 0), False,
     "deploy-bot", 0),
    ("scope outside binding", BOB, Request("token", None, "https://api", ("write",), 0), False,
     "reader", 0),
    ("ttl above cap", BOB, Request("token", None, "https://api", (), 61), False, "reader", 0),
    ("ttl at cap", BOB, Request("token", None, "https://api", (), 60), True, "reader", 60),
    ("default ttl clamps to cap", BOB, Request("token", None, "https://api", (), 0), True,
     "reader", 60),
    ("named other agent", BOB, Request("token", "deploy-bot", "https://api", (), 0), False,
     "deploy-bot", 0),
    ("sign kind not granted", BOB, Request("sign", None), False, "reader", 0),
    ("sign kind granted", ALICE_PY, Request("sign", None), True, "deploy-bot", 300),
    ("nobody", frozenset({"unix:uid:5"}), Request("token", None, "https://api"), False, None, 0),
]


@pytest.mark.parametrize(("name", "caller", "req", "allowed", "agent", "ttl"), CASES,
                         ids=[c[0] for c in CASES])
def test_evaluate(policy: Policy, name: str, caller: frozenset[str], req: Request, allowed: bool,
                  agent: str | None, ttl: int) -> None:
    d = evaluate(policy, caller, req, default_ttl=300)
    assert d.allowed is allowed, d.reason
    assert d.agent == agent
    if allowed:
        assert d.ttl == ttl
        assert d.rule.startswith("policy.toml:")
    else:
        assert d.reason


def test_empty_policy_grants_nothing() -> None:
    d = evaluate(Policy.empty(), ALICE_PY, Request("token", None, "https://api"), default_ttl=300)
    assert not d.allowed


def test_several_agents_must_be_named() -> None:
    text = POLICY + '\n[[bind]]\nagent = "other"\nselectors = ["unix:uid:1000"]\naudiences = ["a"]\n'
    pol = parse_policy(text, "p.toml")
    d = evaluate(pol, ALICE_PY, Request("token", None, "https://api"), default_ttl=300)
    assert not d.allowed and "several agents" in d.reason
    d = evaluate(pol, ALICE_PY, Request("token", "deploy-bot", "https://api"), default_ttl=300)
    assert d.allowed


BAD = [
    ("unknown selector type", 'selectors = ["unix:pid:1"]', "selectors", "unknown selector type"),
    ("non-numeric uid", 'selectors = ["unix:uid:root"]', "selectors", "must be a number"),
    ("relative path", 'selectors = ["unix:path:python"]', "selectors", "absolute"),
    ("no selectors", "selectors = []", "selectors", "must not be empty"),
    ("negative ttl", "max_ttl = -5", "max_ttl", "must be positive"),
    ("huge ttl", 'max_ttl = "1000h"', "max_ttl", "hard cap"),
    ("unknown kind", 'kinds = ["mint"]', "kinds", "unknown kinds"),
]


@pytest.mark.parametrize(("name", "line", "key", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_policy_reports_file_and_line(name: str, line: str, key: str, message: str) -> None:
    base = {
        "agent": 'agent = "a"',
        "selectors": 'selectors = ["unix:uid:1"]',
        "audiences": 'audiences = ["x"]',
        "max_ttl": "max_ttl = 60",
        "kinds": 'kinds = ["token"]',
    }
    base[key] = line
    text = "# comment\n\n[[bind]]\n" + "\n".join(base.values()) + "\n"
    expected_line = text.splitlines().index(line) + 1
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "/etc/badged/policy.toml")
    assert info.value.path == "/etc/badged/policy.toml"
    assert info.value.line == expected_line, str(info.value)
    assert message in str(info.value)


def test_toml_syntax_error_has_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy("[[bind]]\nagent = \n", "p.toml")
    assert info.value.line == 2


def test_unknown_key_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy('[[bind]]\nagent = "a"\nselectors=["unix:uid:1"]\naudiences=["x"]\nallow_all = true\n',
                      "p.toml")
    assert info.value.line == 5 and "allow_all" in str(info.value)


@pytest.mark.parametrize(("text", "seconds"), [(300, 300), ("90s", 90), ("5m", 300), ("1h", 3600)])
def test_durations(text: object, seconds: int) -> None:
    assert parse_duration(text, what="t") == seconds
