"""``badgectl ssh pubkey AGENT``: the agent's SSH key for authorized_keys and allowed_signers.

The key lives in the token (badged's SSH agent socket, ``[ssh] socket``);
this prints its public half in OpenSSH format, the agent's SPIFFE ID as the
comment. Asked on the admin socket like ``agent show``.
"""

from __future__ import annotations

from datetime import UTC, datetime

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


@ssh_group.command("cert")
@click.argument("agent")
@click.option("--validity", default="1h", show_default=True,
              help="How long the certificate is valid (e.g. 30m, 8h; at most 24h).")
@click.option("--out", "-o", "out", type=click.Path(dir_okay=False), default=None,
              help="Write the certificate here (e.g. agent-cert.pub) instead of stdout.")
@json_option
@admin_socket_option
def ssh_cert(agent: str, validity: str, out: str | None, as_json: bool,
             admin_socket: str | None) -> None:
    """Issue a short-lived SSH user certificate for AGENT's key, signed by [ssh] ca_key.

    Principals come from the policy (ssh_principals of the agent's bundles),
    never from this command. Use it with
    ssh -o IdentityAgent=... -o CertificateFile=FILE; servers trust the CA
    with TrustedUserCAKeys.
    """
    about(f"agent {agent!r}")
    seconds = _seconds(validity)
    if seconds is None:
        fail(EXIT_REFUSED, "bad_validity", f"--validity {validity!r}: use e.g. 30m, 8h or 3600s",
             as_json=as_json)
    with AdminClient(admin_socket) as client:
        cert = client.issue_ssh_certificate(agent, validity_seconds=seconds or 0)
    if out is not None:
        with open(out, "w") as fh:
            fh.write(cert.certificate + "\n")
    if as_json:
        emit_json({"agent": agent, "certificate": cert.certificate, "serial": str(cert.serial),
                   "principals": cert.principals, "valid_after": cert.valid_after,
                   "valid_before": cert.valid_before, "ca_public_key": cert.ca_public_key})
    elif out is None:
        click.echo(cert.certificate)
    else:
        until = datetime.fromtimestamp(cert.valid_before, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        click.echo(f"wrote {out}: serial {cert.serial}, principals "
                   f"{','.join(cert.principals)}, valid until {until}", err=True)


def _seconds(text: str) -> int | None:
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip()
    if text.isdigit():
        return int(text)
    if len(text) > 1 and text[:-1].isdigit() and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return None
