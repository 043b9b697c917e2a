"""``badgectl enroll``: get the device a certificate from the operator's CA.

    badgectl enroll -o device.req.json                    # CSR + evidence, for the CA
    badgectl ca sign device.req.json -o chain.pem --dir CA --agent NAME   # at the CA
    badgectl enroll import chain.pem                      # install the device chain
    badgectl enroll status

A TPM device answers a credential-activation challenge in between, which
ties its attestation key to its EK certificate::

    badgectl ca challenge device.req.json --dir CA --ek-ca ek-ca.pem -o chal.json
    badgectl enroll activate chal.json -o resp.json       # on the device
    badgectl ca sign device.req.json --dir CA --ek-ca ek-ca.pem --response resp.json ...
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import click

from badgeclient._cli.options import admin_socket_option, emit_json, json_option
from badgeclient.credentials import EnrollmentClient

_logger = logging.getLogger(__name__)



@click.group("enroll", invoke_without_command=True)
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("device-enroll.json"), show_default=True,
              help="Where to write the enrollment request.")
@click.option("--nonce", default="", help="Nonce from the CA, echoed in the evidence.")
@json_option
@admin_socket_option
@click.pass_context
def enroll_group(ctx: click.Context, out: Path, nonce: str, as_json: bool,
                 admin_socket: str | None) -> None:
    """Write this device's enrollment request (CSR + key evidence) for the CA."""
    ctx.ensure_object(dict)
    ctx.obj["admin_socket"] = admin_socket
    if ctx.invoked_subcommand is not None:
        return
    with EnrollmentClient(admin_socket) as c:
        request = c.request(nonce)
    out.write_text(request)
    device = json.loads(request)["device_id"]
    if as_json:
        emit_json({"request": str(out), "device_id": device})
        return
    click.echo(f"wrote {out} for device {device}; take it to the CA (badgectl ca sign {out} "
               f"-o chain.pem; a TPM device first: badgectl ca challenge {out})")


@enroll_group.command("activate")
@click.argument("challenge", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("device-activation.json"), show_default=True,
              help="Where to write the response for the CA.")
@json_option
@admin_socket_option
@click.pass_context
def enroll_activate(ctx: click.Context, challenge: Path, out: Path, as_json: bool,
                    admin_socket: str | None) -> None:
    """Answer the CA's CHALLENGE with this device's TPM (TPM2_ActivateCredential)."""
    with EnrollmentClient(admin_socket or ctx.obj.get("admin_socket")) as c:
        response = c.activate(challenge.read_text())
    out.write_text(response)
    if as_json:
        emit_json({"response": str(out)})
        return
    click.echo(f"wrote {out}; take it back to the CA with the request "
               f"(badgectl ca sign REQUEST --response {out} ...)")


@enroll_group.command("import")
@click.argument("chain", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@json_option
@admin_socket_option
@click.pass_context
def enroll_import(ctx: click.Context, chain: Path, as_json: bool, admin_socket: str | None) -> None:
    """Install CHAIN (PEM: device certificate first, then its issuers); prints JSON."""
    with EnrollmentClient(admin_socket or ctx.obj.get("admin_socket")) as c:
        status = c.import_chain(chain.read_text())
    emit_json(asdict(status))


@enroll_group.command("status")
@json_option
@admin_socket_option
@click.pass_context
def enroll_status(ctx: click.Context, as_json: bool, admin_socket: str | None) -> None:
    """Is the device enrolled, by whom, until when, for which agents (always JSON)."""
    with EnrollmentClient(admin_socket or ctx.obj.get("admin_socket")) as c:
        status = c.status()
    emit_json(asdict(status))
