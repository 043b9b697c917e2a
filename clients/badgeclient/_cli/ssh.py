"""``badgectl ssh pubkey AGENT``: the agent's SSH key for authorized_keys and allowed_signers.

The key lives in the token (badged's SSH agent socket, ``[ssh] socket``);
this prints its public half in OpenSSH format, the agent's SPIFFE ID as the
comment. Asked on the admin socket like ``agent show``.
"""

from __future__ import annotations

import click

from badgeclient._cli.options import (
    EXIT_REFUSED,
    about,
    admin_socket_option,
    emit_json,
    fail,
    json_option,
)
from badgeclient.client import AdminClient


@click.group("ssh")
def ssh_group() -> None:
    """The agents' SSH keys (badged's SSH agent socket)."""


@ssh_group.command("pubkey")
@click.argument("agent")
@click.option("--principal", default="",
              help="Print an allowed_signers line for this principal (e.g. an e-mail).")
@json_option
@admin_socket_option
def ssh_pubkey(agent: str, principal: str, as_json: bool, admin_socket: str | None) -> None:
    """Print AGENT's current SSH public key (authorized_keys format)."""
    about(f"agent {agent!r}")
    with AdminClient(admin_socket) as client:
        info = client.get_agent(agent)
    line = next((k.ssh_public_key for k in info.keys if k.version == info.current_version), "")
    if not line:
        fail(EXIT_REFUSED, "no_ssh_key",
             f"agent {agent!r} has no SSH key (is [ssh] socket set in the daemon's config?)",
             as_json=as_json)
    if as_json:
        emit_json({"agent": info.name, "spiffe_id": info.spiffe_id,
                   "version": info.current_version, "public_key": line})
        return
    click.echo(f"{principal} {line}" if principal else line)
