"""Every command module is registered in badgectl, with no name registered twice
(click would silently let the later one win)."""

from __future__ import annotations

from collections import Counter

from click.testing import CliRunner

from badgeclient._cli.credentials import COMMANDS as CREDENTIAL_COMMANDS
from badgeclient._cli.main import cli
from badgeclient._cli.policy import COMMANDS as POLICY_COMMANDS

BASE = {"token", "jwks", "whoami", "sign", "agent"}


def test_every_command_registered_once() -> None:
    names = [*BASE, *(c.name for c in (*POLICY_COMMANDS, *CREDENTIAL_COMMANDS)),
             "audit", "enroll", "ca", "verify", "health", "metrics", "ssh", "proxy", "secret"]
    dupes = [n for n, k in Counter(names).items() if k > 1]
    assert not dupes, dupes
    assert set(names) == set(cli.commands)


def test_subcommands_answer_help_and_usage_errors() -> None:
    runner = CliRunner()
    for args in (["dpop", "--help"], ["enroll", "import", "--help"], ["ca", "sign", "--help"],
                 ["verify", "--help"], ["assertion", "--help"], ["cert", "--help"],
                 ["policy", "explain", "--help"], ["audit", "verify", "--help"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
    usage = runner.invoke(cli, ["verify", "x"])
    assert usage.exit_code == 2 and "--audience" in usage.output
