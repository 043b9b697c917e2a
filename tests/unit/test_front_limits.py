"""[limits]: the example file's values load, and budgets that break the front's invariants are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from badged.config import load_config
from badged.errors import ConfigError
from badged.listener.budget import FrontLimits, connection_cap, could_match
from badged.policy.model import AgentRule, Policy
from tests.conftest import ROOT


def _config(tmp_path: Path, limits: str) -> Path:
    p = tmp_path / "badged.toml"
    p.write_text('[keystore]\nuri = "pkcs11:token=x"\n[limits]\n' + limits)
    return p


def test_the_example_limits_load_as_documented(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "badged.example.toml").read_text()
    limits = load_config(_config(tmp_path, text[text.index("[limits]") + 9:])).front_limits
    assert limits == FrontLimits()  # the example documents the defaults


@pytest.mark.parametrize("text, why", [
    ("unbound_buffered_per_uid = 1000\n", "below 16 connections"),
    ("connection_buffer = 1000\n", "connection_buffer"),
    ("body_timeout = \"soon\"\n", "body_timeout"),
    ("streams_per_uid = true\n", "streams_per_uid"),
])
def test_limits_that_break_the_invariants_are_refused(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, text))
    assert why in str(info.value) and "badged.toml:" in str(info.value)  # file:line


def test_connection_cap_stays_below_the_fd_limit() -> None:
    assert connection_cap(1024, FrontLimits()) == (1024 - 128) // 2
    assert connection_cap(524288, FrontLimits()) == 4096


def test_uids_no_rule_could_match_are_unbound() -> None:
    def rule(*sels: str) -> AgentRule:
        return AgentRule(agent="a", selectors=frozenset(sels), bundles=("b",), source="x")

    by_uid = Policy(agents=(rule("unix:uid:1000", "unix:sha256:" + "0" * 64),))
    assert could_match(by_uid, 1000) and not could_match(by_uid, 1001)
    anyone = Policy(agents=(rule("unix:path:/usr/bin/agent"),))
    assert could_match(anyone, 1001)
    assert not could_match(Policy.empty(), 0)
