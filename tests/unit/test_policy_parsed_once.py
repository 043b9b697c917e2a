"""Start-up parses the policy file once (issue 22: 10,000 rules took ~1 s a parse, three parses).

The start-up check (``badged.preflight``) parses the TOML once for its errors
and its selector warnings, and the daemon takes the policy the check built,
but only while the file still holds the very text checked: an edit in
between is loaded afresh, never the stale check.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from badged import preflight
from badged.config import DaemonConfig
from badged.policy.check import check_policy
from badged.policy.loader import load_policy

POLICY = """
[bundle.demo]
audiences = ["https://api.example.com"]
scopes = ["read"]

[[agent]]
name = "bot"
selectors = ["unix:uid:0"]
bundles = ["demo"]

[[agent]]
name = "ghost"
selectors = ["unix:uid:3999999"]
bundles = ["demo"]
"""


def _count_toml(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = tomllib.loads

    def counting(text: str, **kw: Any) -> dict[str, Any]:
        calls.append(len(text))
        return real(text, **kw)

    monkeypatch.setattr(tomllib, "loads", counting)
    return calls


def _config(path: Path) -> DaemonConfig:
    return cast(DaemonConfig, SimpleNamespace(policy_file=path))


def test_the_check_parses_once_and_keeps_what_the_daemon_would_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    calls = _count_toml(monkeypatch)
    report = check_policy(path)
    assert len(calls) == 1
    assert report.ok and report.agents == 2
    assert any("3999999" in w.message for w in report.warnings)  # warnings from that parse
    loaded = load_policy(path)
    assert report.policy is not None and report.policy.agents == loaded.agents
    assert report.policy.bundles == loaded.bundles


def test_the_daemon_takes_the_checked_policy_once_and_only_if_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    problems = preflight._policy_problems(_config(path))
    assert not [p for p in problems if p.fatal]
    calls = _count_toml(monkeypatch)
    taken = preflight.checked_policy(path)
    assert taken is not None and [a.agent for a in taken.agents] == ["bot", "ghost"]
    assert calls == []  # no parse
    assert preflight.checked_policy(path) is None  # once: the daemon's later reloads read the file

    preflight._policy_problems(_config(path))
    path.write_text(POLICY.replace('name = "ghost"', 'name = "edited"'))
    assert preflight.checked_policy(path) is None  # edited after the check: load it afresh
    assert [a.agent for a in load_policy(path).agents] == ["bot", "edited"]


def test_a_policy_with_errors_is_never_kept(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY + '\n[[agent]]\nname = "bad"\nbundles = ["nope"]\n')
    problems = preflight._policy_problems(_config(path))
    assert [p for p in problems if p.fatal]
    assert preflight.checked_policy(path) is None
