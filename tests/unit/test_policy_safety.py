"""Issue 13's policy corners as pure tables: unsafe bindings are refused at
load, a gated bundle cannot be bypassed through another that allows the same
request, agents may not delegate, and unix:path across mount namespaces is
an explicit opt-in."""

from __future__ import annotations

import pytest

from badged.errors import ConfigError
from badged.policy.loader import parse_policy
from badged.policy.model import (
    OTHER_NS_PATH,
    Bundle,
    Grant,
    Policy,
    Rate,
    Request,
    delegation_refusal,
    evaluate,
)

NOW = 1_800_000_000.0
SHA = "ab" * 32

BUNDLES = """
[bundle.b]
audiences = ["x"]
kinds = ["token", "sign"]
"""


@pytest.mark.parametrize("selectors", [
    [f"unix:sha256:{SHA}"], ["unix:path:/usr/bin/python3"], ["systemd:unit:deploy-bot.service"],
    ["container:id:" + "c" * 64], ["unix:parent_path:/usr/bin/bash"],
    ["unix:ancestor_path:/usr/sbin/cron"], ["unix:cgroup:/system.slice/x.service"],
    ["systemd:unit:deploy-bot.service", "unix:path:/usr/bin/python3.11"],
])
def test_binding_by_what_runs_without_a_user_is_refused(selectors: list[str]) -> None:
    sels = ", ".join(f'"{s}"' for s in selectors)
    text = BUNDLES + f'\n[[agent]]\nname = "a"\nselectors = [{sels}]\nbundles = ["b"]\n'
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "/etc/badged/policy.toml")
    msg = str(info.value)
    assert "policy.toml:8" in msg and "without a unix:uid" in msg and "allow_any_user" in msg


@pytest.mark.parametrize("user", ["unix:uid:1000", "unix:user:deploy", "unix:gid:10",
                                  "unix:group:deploy", "unix:supplementary_gid:10"])
def test_binding_with_a_user_selector_loads(user: str) -> None:
    text = (BUNDLES + f'\n[[agent]]\nname = "a"\nselectors = ["unix:sha256:{SHA}", "{user}"]\n'
            'bundles = ["b"]\n')
    pol = parse_policy(text, "p.toml")
    assert pol.agents[0].selectors == {f"unix:sha256:{SHA}", user} and not pol.warnings


def test_allow_any_user_loads_with_a_warning() -> None:
    text = (BUNDLES + f'\n[[agent]]\nname = "a"\nselectors = ["unix:sha256:{SHA}"]\n'
            'bundles = ["b"]\nallow_any_user = true\n')
    pol = parse_policy(text, "p.toml")
    assert pol.agents[0].allow_any_user
    assert len(pol.warnings) == 1 and "p.toml:10" in pol.warnings[0]
    bind = ('[[bind]]\nagent = "a"\nselectors = ["systemd:unit:a.service"]\naudiences = ["x"]\n'
            'allow_any_user = true\n')
    assert parse_policy(bind, "p.toml").warnings
    with pytest.raises(ConfigError, match="without a unix:uid"):
        parse_policy(bind.replace("allow_any_user = true\n", ""), "p.toml")
    with pytest.raises(ConfigError, match="must be true or false"):
        parse_policy(text.replace("allow_any_user = true", 'allow_any_user = "yes"'), "p.toml")


def test_uid_only_rule_needs_no_flag() -> None:
    pol = parse_policy(BUNDLES + '\n[[agent]]\nname = "a"\nselectors = ["unix:uid:7"]\n'
                       'bundles = ["b"]\n', "p.toml")
    assert not pol.warnings


# -- a gate cannot be bypassed through another bundle ---------------------------------

GATED = """
[baseline]
audiences = ["status"]
kinds = ["token", "sign"]

[bundle.signing]
kinds = ["sign"]
approval = true

[[agent]]
name = "a"
selectors = ["unix:uid:7"]
bundles = ["signing"]
"""


def test_loader_rejects_sign_allowed_by_gated_and_ungated_bundles() -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(GATED, "p.toml")
    msg = str(info.value)
    assert "p.toml:13" in msg and "kind 'sign'" in msg and "baseline" in msg
    rated = GATED.replace("approval = true", 'rate = "1/1h"')
    with pytest.raises(ConfigError, match="different approval/rate"):
        parse_policy(rated, "p.toml")
    # csr the same way; and the same gate on both is not ambiguous.
    csr = GATED.replace('"token", "sign"', '"token", "csr"').replace('["sign"]', '["csr"]')
    with pytest.raises(ConfigError, match="kind 'csr'"):
        parse_policy(csr, "p.toml")
    same = GATED.replace('kinds = ["token", "sign"]', 'kinds = ["token", "sign"]\napproval = true')
    assert parse_policy(same, "p.toml").agents


def _b(name: str, *, approval: bool = False, rate: Rate | None = None) -> Bundle:
    return Bundle(name, frozenset({"x"}), frozenset(), frozenset({"token", "sign"}), 300,
                  rate=rate, approval=approval)


def test_strictest_bundle_decides_even_through_a_step_up() -> None:
    """The loader cannot see step-ups: evaluation itself applies the strictest gate."""
    from badged.policy.model import AgentRule

    policy = Policy(agents=(AgentRule("a", frozenset({"unix:uid:7"}), ("open",), "p:1"),),
                    bundles={"open": _b("open"), "gated": _b("gated", approval=True),
                             "slow": _b("slow", rate=Rate(1, 3600)),
                             "fast": _b("fast", rate=Rate(100, 60))})
    caller = frozenset({"unix:uid:7"})
    grant = Grant("g-1", "a", "gated", NOW - 1, NOW + 600, "r", "root")
    d = evaluate(policy, caller, Request("sign", None), now=NOW, default_ttl=60,
                 grants=[grant])
    assert d.allowed and d.bundle == "gated" and d.approval_required and d.grant == "g-1"
    # Rate: the lowest rate decides, and its exhaustion is not dodged via "fast"/"open".
    grants = [Grant("g-2", "a", "fast", NOW - 1, NOW + 600, "r", "root"),
              Grant("g-3", "a", "slow", NOW - 1, NOW + 600, "r", "root")]
    d = evaluate(policy, caller, Request("sign", None), now=NOW, default_ttl=60, grants=grants,
                 budget=lambda agent, bundle: 42.0 if bundle.name == "slow" else None)
    assert not d.allowed and d.retry_after == 42.0 and d.bundle == "slow"
    plain = evaluate(policy, caller, Request("sign", None), now=NOW, default_ttl=60)
    assert plain.allowed and plain.bundle == "open" and not plain.approval_required


# -- delegation by agents ----------------------------------------------------------------

DELEG = """
[bundle.b]
audiences = ["x"]

[[agent]]
name = "bot"
selectors = ["unix:uid:1002"]
bundles = ["b"]

[delegation]
allow = ["unix:group:staff"]
"""


def test_a_caller_that_is_an_agent_cannot_delegate() -> None:
    pol = parse_policy(DELEG, "p.toml")
    human = frozenset({"unix:uid:1000", "unix:group:staff"})
    agent = frozenset({"unix:uid:1002", "unix:group:staff"})
    assert delegation_refusal(pol, human) is None
    reason = delegation_refusal(pol, agent)
    assert reason is not None and "bot" in reason and "may not delegate" in reason
    assert delegation_refusal(pol, frozenset({"unix:uid:1000"})) is not None
    dev = parse_policy(DELEG.replace('allow = ["unix:group:staff"]',
                                     'allow = ["unix:group:staff"]\nagents_may_delegate = true'),
                       "p.toml")
    assert dev.agents_may_delegate and delegation_refusal(dev, agent) is None


def test_requester_may_approve_is_off_unless_set() -> None:
    assert not parse_policy(DELEG, "p.toml").requester_may_approve
    on = parse_policy(DELEG + "\n[approval]\nrequester_may_approve = true\n", "p.toml")
    assert on.requester_may_approve
    with pytest.raises(ConfigError, match=r"\[approval\] takes only"):
        parse_policy(DELEG + "\n[approval]\nself = true\n", "p.toml")


# -- unix:path across mount namespaces ---------------------------------------------------

def test_other_mount_ns_is_a_per_rule_opt_in() -> None:
    text = (BUNDLES + '\n[[agent]]\nname = "a"\nselectors = ["unix:uid:7", "unix:path:/bin/x"]\n'
            'bundles = ["b"]\n')
    strict = parse_policy(text, "p.toml").agents[0]
    loose = parse_policy(text + "other_mount_ns = true\n", "p.toml").agents[0]
    same_ns = frozenset({"unix:uid:7", "unix:path:/bin/x"})
    other_ns = frozenset({"unix:uid:7", f"{OTHER_NS_PATH}/bin/x"})
    assert strict.matches(same_ns) and not strict.matches(other_ns)
    assert loose.matches(same_ns) and loose.matches(other_ns)
    with pytest.raises(ConfigError, match="unknown selector type"):  # not nameable in a policy
        parse_policy(text.replace("unix:path:/bin/x", "unix:path_other_mount_ns:/bin/x"), "p")
    no_path = BUNDLES + '\n[[agent]]\nname = "a"\nselectors = ["unix:uid:7"]\nbundles = ["b"]\n'
    with pytest.raises(ConfigError, match="other_mount_ns applies to unix:path"):
        parse_policy(no_path + "other_mount_ns = true\n", "p.toml")
