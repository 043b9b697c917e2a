"""The new command modules plug into badgectl's group without name clashes,
exactly as main.py will register them."""

from __future__ import annotations

import click
from click.testing import CliRunner

from badgeclient._cli.ca import ca_group
from badgeclient._cli.credentials import COMMANDS
from badgeclient._cli.enroll import enroll_group
from badgeclient._cli.main import cli
from badgeclient._cli.verify import verify_command


def test_registration_adds_commands_without_clashes() -> None:
    group = click.Group("badgectl", commands=dict(cli.commands))
    before = set(group.commands)
    new = {c.name for c in COMMANDS} | {"enroll", "ca", "verify"}
    assert not before & new, before & new
    for command in COMMANDS:
        group.add_command(command)
    group.add_command(enroll_group, "enroll")
    group.add_command(ca_group, "ca")
    group.add_command(verify_command, "verify")
    runner = CliRunner()
    for args in (["dpop", "--help"], ["enroll", "import", "--help"], ["ca", "sign", "--help"],
                 ["verify", "--help"], ["assertion", "--help"], ["cert", "--help"]):
        result = runner.invoke(group, args)
        assert result.exit_code == 0, (args, result.output)
    usage = runner.invoke(group, ["verify", "x"])
    assert usage.exit_code == 2 and "--audience" in usage.output
