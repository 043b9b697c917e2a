"""Policy rules are indexed (issue 22): a request's cost does not depend on rules that cannot apply.

The index must give exactly the rules a full scan gives, in policy order
(including rules that also match from another mount namespace), and
``evaluate`` must look at no rule keyed on selectors the caller lacks.
"""

from __future__ import annotations

import random

import pytest

from badged.policy.model import (
    OTHER_NS_PATH,
    AgentRule,
    Bundle,
    Policy,
    Request,
    candidates,
    evaluate,
)

SELECTORS = [f"unix:uid:{u}" for u in range(6)] + [f"unix:gid:{g}" for g in range(4)] + [
    "unix:path:/usr/bin/a", "unix:path:/usr/bin/b", "unix:sha256:" + "0" * 64,
    "systemd:unit:x.service"]


def _rule(agent: str, sels: set[str], *, other_ns: bool = False) -> AgentRule:
    return AgentRule(agent=agent, selectors=frozenset(sels), bundles=("b",), source=agent,
                     other_mount_ns=other_ns)


def test_the_index_finds_exactly_what_a_full_scan_finds_in_order() -> None:
    rng = random.Random(22)
    for _ in range(200):
        rules = tuple(_rule(f"a{i}", set(rng.sample(SELECTORS, rng.randint(0, 3))),
                            other_ns=rng.random() < 0.2) for i in range(rng.randint(0, 30)))
        policy = Policy(agents=rules)
        for _ in range(20):
            caller = set(rng.sample(SELECTORS, rng.randint(0, 6)))
            if rng.random() < 0.3:  # a caller in another mount namespace
                caller = {s.replace("unix:path:", OTHER_NS_PATH)
                          if s.startswith("unix:path:") else s for s in caller}
            scan = [r for r in rules if r.matches(caller)]
            assert policy.matching(caller) == scan == candidates(policy, caller)
            for name in {r.agent for r in rules}:
                assert list(policy.rules_for_agent(name)) == [r for r in rules if r.agent == name]


def test_evaluate_does_not_look_at_rules_that_cannot_apply(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 rules for other uids, or for this uid with another binary: none examined."""
    others = [_rule(f"other-{i}", {f"unix:uid:{100000 + i}"}) for i in range(5000)]
    same_uid = [_rule(f"bin-{i}", {"unix:uid:1000", f"unix:sha256:{i:064x}"})
                for i in range(5000)]
    mine = _rule("me", {"unix:uid:1000"})
    bundle = Bundle("b", frozenset({"aud"}), frozenset({"read"}), frozenset({"token"}), 600)
    policy = Policy(agents=(*others, *same_uid, mine), bundles={"b": bundle})
    caller = frozenset({"unix:uid:1000", "unix:gid:1000", "unix:path:/usr/bin/agent"})
    looked: list[str] = []
    real = AgentRule.matches

    def counting(self: AgentRule, sels: frozenset[str]) -> bool:
        looked.append(self.agent)
        return real(self, sels)

    monkeypatch.setattr(AgentRule, "matches", counting)
    for agent in (None, "me"):
        looked.clear()
        d = evaluate(policy, caller, Request(kind="token", agent=agent, audience="aud",
                                             scopes=("read",)), now=0.0, default_ttl=60)
        assert d.allowed and d.agent == "me", d.explain()
        assert looked == ["me"], looked[:5]


def _big_policy(n: int) -> str:
    head = ('[bundle.demo]\naudiences = ["aud"]\nscopes = ["read"]\nkinds = ["token"]\n'
            'max_ttl = "1h"\n\n')
    return head + "\n".join(f'[[agent]]\nname = "a{i}"\nselectors = ["unix:uid:{10000 + i}"]\n'
                            'bundles = ["demo"]\n' for i in range(n))


def test_loading_many_rules_reads_the_text_a_bounded_number_of_times(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding each [[agent]]'s line scanned the whole file once per rule: quadratic."""
    from badged.policy import loader

    scanned = 0

    class Counting(list[str]):
        def __iter__(self):  # type: ignore[no-untyped-def]
            nonlocal scanned
            scanned += len(self)
            return super().__iter__()

    real_init = loader._Lines.__init__

    def init(self: loader._Lines, text: str) -> None:
        real_init(self, text)
        self.lines = Counting(self.lines)

    monkeypatch.setattr(loader._Lines, "__init__", init)
    text = _big_policy(2000)
    policy = loader.parse_policy(text, "big.toml")
    assert len(policy.agents) == 2000
    rows = text.splitlines()
    line = int(policy.agents[1999].source.split(":")[1])  # file:line still right
    assert rows[line - 1] == "[[agent]]" and rows[line] == 'name = "a1999"'
    lines = len(rows)
    assert scanned <= 5 * lines, f"{scanned} lines scanned for a {lines}-line policy"


def test_rules_with_the_same_selectors_for_two_agents_are_still_refused() -> None:
    from badged.errors import ConfigError
    from badged.policy import loader

    text = _big_policy(50) + ('\n[[agent]]\nname = "a7-again"\nselectors = ["unix:uid:10007"]\n'
                              'bundles = ["demo"]\n')
    with pytest.raises(ConfigError) as info:
        loader.parse_policy(text, "dup.toml")
    assert "same selectors as 'a7'" in str(info.value)
    ok = _big_policy(3) + '\n[[agent]]\nname = "a1"\nselectors = ["unix:uid:10001"]\n' \
        'bundles = ["demo"]\n'
    assert len(loader.parse_policy(ok, "same-agent.toml").agents) == 4  # same agent: allowed


def test_policy_check_finds_warning_lines_in_one_pass() -> None:
    """badged's start-up check placed each unknown-uid warning by re-splitting the file:
    10,000 rules for absent users took ~80 s before the daemon was ready."""
    from badged.policy import check

    splits = 0

    class Counting(str):
        def splitlines(self, keepends: bool = False) -> list[str]:
            nonlocal splits
            splits += 1
            return super().splitlines(keepends)

    text = _big_policy(3000).replace("unix:uid:10", "unix:uid:9999")  # uids nobody has
    found = check._selector_warnings(Counting(text))
    assert len(found) == 3000 and splits <= 2, splits
    rows = text.splitlines()
    for f in (found[0], found[1234], found[-1]):  # still the line the selector is on
        sel = f.message.split(": ")[0]
        assert f.line is not None and f'"{sel}"' in rows[f.line - 1]
