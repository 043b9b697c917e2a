"""The pytest plugin, run the way a downstream project runs it.

``examples/downstream_ci`` (pytest.ini + conftest + agent + tests) is copied
into a scratch dir and pytest runs there in a subprocess, with the installed
packages only (no PYTHONPATH into this checkout): the plugin comes in through
its ``pytest11`` entry point, starts a real ``badged dev`` on SoftHSM per
test, and must stop it and remove its state.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

from badgeclient.pytest_plugin import policy_toml, simple_policy, start_badged_dev
from tests.conftest import ROOT
from tests.e2e.conftest import softhsm_available

__all__ = ["softhsm_available"]

pytest_plugins = ["pytester"]

EXAMPLE = ROOT / "examples" / "downstream_ci"


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT / "daemon"), str(ROOT / "clients")])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.softhsm
@pytest.mark.slow
def test_example_downstream_project(pytester: pytest.Pytester, softhsm_available: None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for f in EXAMPLE.iterdir():
        if f.is_file():
            shutil.copy(f, pytester.path / f.name)
    record = pytester.path / "record.txt"
    session_record = pytester.path / "session.txt"
    # One more test beside the example's: where the daemon ran, to check it is gone after.
    pytester.makepyfile(test_zz_record=textwrap.dedent(f"""
        def test_record(badged_dev):
            assert badged_dev.client.whoami().agents[0].agent == "ci-bot"
            with open({str(record)!r}, "w") as fh:
                fh.write(f"{{badged_dev.pid}} {{badged_dev.state_dir}}")

        def test_session_a(badged_dev_session):
            with open({str(session_record)!r}, "a") as fh:
                fh.write(f"{{badged_dev_session.pid}} {{badged_dev_session.state_dir}}\\n")

        def test_session_b(badged_dev_session):
            assert badged_dev_session.client.whoami().agents[0].agent == "ci-bot"
            with open({str(session_record)!r}, "a") as fh:
                fh.write(f"{{badged_dev_session.pid}} {{badged_dev_session.state_dir}}\\n")
        """))
    # As a user runs it: the installed badged/badgeclient, the entry point, nothing else.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=400)
    result.assert_outcomes(passed=5)
    pid, state = record.read_text().split()
    assert not _alive(int(pid)), "badged dev still running after the test"
    assert not Path(state).exists(), "state dir left behind"
    # The session fixture: one daemon for both tests, gone after the run.
    lines = session_record.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], lines
    pid, state = lines[0].split()
    assert not _alive(int(pid)) and not Path(state).exists()


@pytest.mark.softhsm
@pytest.mark.slow
def test_missing_softhsm_fails_unless_skipping_is_asked_for(pytester: pytest.Pytester,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_x="def test_x(badged_dev):\n    pass\n")
    monkeypatch.setenv("PYTHONPATH", _pythonpath())
    monkeypatch.setenv("PATH", "/nonexistent")  # no softhsm2-util to be found
    result = pytester.runpytest_subprocess("-q")  # the entry point loads the plugin
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs SoftHSM*"])
    pytester.makeini("[pytest]\nbadged_skip_without_softhsm = true\n")
    # The explicit -p of the older recipe is not a second registration.
    result = pytester.runpytest_subprocess("-q", "-p", "badgeclient.pytest_plugin")
    result.assert_outcomes(skipped=1)
    result = pytester.runpytest_subprocess("-q", "-p", "no:badgeclient.pytest_plugin")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'badged_dev' not found*"])


@pytest.mark.softhsm
@pytest.mark.slow
def test_a_daemon_that_refuses_to_start_is_reported(softhsm_available: None) -> None:
    with pytest.raises(RuntimeError) as info, \
            start_badged_dev(policy="[[agent]]\nname = 42\n", timeout=60):
        pass
    text = str(info.value)
    assert "did not become ready: it exited with status" in text
    assert "policy" in text.lower()


def test_policy_dict_to_toml_round_trips() -> None:
    policy = simple_policy("a", audiences=["https://x", 'we"ird'], scopes=["r"], uid=1000)
    policy["delegation"] = {"allow": ["unix:uid:1000"], "agents_may_delegate": True}
    policy["bundle"] = {"ci": {"audiences": ["https://x"], "rate": "10/1m", "max_ttl": "5m"}}
    text = policy_toml(policy)
    assert "[[agent]]" in text and "[bundle.ci]" in text
    import tomllib
    assert tomllib.loads(text)["agent"][0]["selectors"] == ["unix:uid:1000"]
    with pytest.raises(TypeError):
        policy_toml({"x": {"when": object()}})  # type: ignore[dict-item]
