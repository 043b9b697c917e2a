"""``badgectl assertion|attestation|dpop|csr|cert|trust-bundle``: attested
credential requests and proofs of possession, for agent processes.

Each command prints the credential (or JSON with ``--json``) and nothing
else on stdout, so it composes with curl::

    curl -H "DPoP: $(badgectl dpop --htm GET --htu https://api/x --access-token-file tok)" ...
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from badgeclient._cli.options import json_option, socket_option
from badgeclient.credentials import CredentialClient

_logger = logging.getLogger(__name__)

agent_option = click.option("--agent", default=None,
                            help="Agent to act as, if the caller maps to several.")


def parse_context(values: tuple[str, ...]) -> dict[str, str]:
    """``--context k=v`` (repeatable) to a map; the daemon validates keys and values.

    Keys: channel, task, session, on_behalf_of. What the agent is working on,
    *asserted* by it: the daemon records it and narrows context-scoped grants
    with it, but cannot check it (docs/credentials.md, "Request context").
    """
    out: dict[str, str] = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{text!r} is not key=value (e.g. channel=#deploy)",
                                     param_hint="--context")
        if key in out:
            raise click.BadParameter(f"{key!r} given twice", param_hint="--context")
        out[key] = value
    return out


context_option = click.option(
    "--context", "context", multiple=True, metavar="KEY=VALUE",
    help="Request context (channel, task, session, on_behalf_of), repeatable. Asserted by "
         "the agent, not attested: narrows context-scoped grants, carried in the token.")


def _emit(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


@click.command("assertion")
@click.option("--audience", "-a", required=True, help="Token endpoint (aud) of the OAuth server.")
@click.option("--client-id", default="",
              help="OAuth client id: the agent's SPIFFE ID (default) or one the policy "
                   "lists for the agent (client_ids); anything else is refused.")
@click.option("--ttl", type=int, default=0, help="Lifetime in seconds, 1..300 (0 = 60).")
@click.option("--x5c", "include_x5c", is_flag=True,
              help="Carry the agent's certificate chain (enrolled devices).")
@json_option
@agent_option
@socket_option
def assertion_command(audience: str, client_id: str, ttl: int, include_x5c: bool, as_json: bool,
                      agent: str | None, socket_path: str | None) -> None:
    """RFC 7523 client assertion for private_key_jwt client authentication."""
    with CredentialClient(socket_path) as c:
        a = c.client_assertion(audience=audience, client_id=client_id, ttl_seconds=ttl, agent=agent,
                               include_x5c=include_x5c)
    if as_json:
        _emit({"assertion": a.assertion, "agent": a.agent, "spiffe_id": a.spiffe_id,
               "client_id": a.client_id, "jti": a.jti, "expires_at": a.expires_at,
               "kid": a.key_id})
    else:
        click.echo(a.assertion)


@click.command("attestation")
@click.option("--audience", "-a", required=True, help="The authorization server (PoP aud).")
@click.option("--client-id", default="",
              help="Attested client id (sub): as for `assertion`, own or policy-listed only.")
@click.option("--challenge", default="", help="Server-provided challenge for the PoP.")
@click.option("--ttl", type=int, default=0, help="Attestation lifetime (0 = 3600 s).")
@json_option
@agent_option
@socket_option
def attestation_command(audience: str, client_id: str, challenge: str, ttl: int, as_json: bool,
                        agent: str | None, socket_path: str | None) -> None:
    """OAuth client attestation + PoP (attestation-based client auth), as JSON."""
    with CredentialClient(socket_path) as c:
        a = c.client_attestation(audience=audience, client_id=client_id, challenge=challenge,
                                 ttl_seconds=ttl, agent=agent)
    _emit({"client_attestation": a.attestation, "client_attestation_pop": a.pop,
           "agent": a.agent, "spiffe_id": a.spiffe_id, "client_id": a.client_id,
           "expires_at": a.expires_at, "pop_jti": a.pop_jti})


@click.command("dpop")
@click.option("--htm", required=True, help="HTTP method of the request.")
@click.option("--htu", required=True, help="Target URI (query and fragment are dropped).")
@click.option("--access-token-file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="File holding the access token to bind (ath); '-' = stdin.")
@click.option("--nonce", default="", help="The server's DPoP-Nonce.")
@json_option
@agent_option
@socket_option
def dpop_command(htm: str, htu: str, access_token_file: Path | None, nonce: str, as_json: bool,
                 agent: str | None, socket_path: str | None) -> None:
    """RFC 9449 DPoP proof for one HTTP request, signed by the agent's key.

    The access token is read from a file, never from argv (process listings).
    """
    token = ""
    if access_token_file is not None:
        if str(access_token_file) == "-":
            token = sys.stdin.read().strip()
        else:
            token = access_token_file.read_text().strip()
    with CredentialClient(socket_path) as c:
        p = c.dpop_proof(htm=htm, htu=htu, access_token=token, nonce=nonce, agent=agent)
    if as_json:
        _emit({"proof": p.proof, "jkt": p.jkt, "jti": p.jti, "iat": p.issued_at, "agent": p.agent})
    else:
        click.echo(p.proof)


@click.command("csr")
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the PEM CSR here (default: stdout).")
@json_option
@agent_option
@socket_option
def csr_command(out: Path | None, as_json: bool, agent: str | None,
                socket_path: str | None) -> None:
    """PKCS#10 CSR for the agent key, with badged attestation evidence inside."""
    with CredentialClient(socket_path) as c:
        csr = c.create_csr(agent=agent)
    if as_json:
        if out is not None:
            out.write_text(csr.csr_pem)
        _emit({"csr_pem": csr.csr_pem, "spiffe_id": csr.spiffe_id,
               "out": str(out) if out is not None else None})
        return
    if out is None:
        click.echo(csr.csr_pem, nl=False)
    else:
        out.write_text(csr.csr_pem)
        click.echo(f"wrote {out} for {csr.spiffe_id}", err=True)


@click.command("cert")
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Agent certificate (PEM).")
@click.option("--chain-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Device chain without the root (PEM), for -untrusted.")
@json_option
@agent_option
@socket_option
def cert_command(out: Path, chain_out: Path | None, as_json: bool, agent: str | None,
                 socket_path: str | None) -> None:
    """The agent's X.509 certificate from the enrolled device (renewed at half life)."""
    with CredentialClient(socket_path) as c:
        cert = c.agent_certificate(agent=agent)
    out.write_text(cert.certificate_pem)
    if chain_out is not None:
        chain_out.write_text(cert.chain_pem)
    _emit({"agent": cert.agent, "spiffe_id": cert.spiffe_id, "serial": cert.serial_hex,
           "not_before": cert.not_before, "not_after": cert.not_after})


@click.command("trust-bundle")
@click.option("--chain-out", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--crl-out", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--jwks", "as_jwks", is_flag=True,
              help="Print only a JWK Set of the device key: what `badgectl verify --kind "
                   "attestation --jwks` trusts before enrollment (`badgectl jwks` holds the "
                   "agents' token keys, never the device key).")
@json_option
@socket_option
def trust_bundle_command(chain_out: Path | None, crl_out: Path | None, as_jwks: bool,
                         as_json: bool, socket_path: str | None) -> None:
    """Public material for relying parties: the device chain and the agent CRL."""
    with CredentialClient(socket_path) as c:
        b = c.trust_bundle()
    if chain_out is not None and b.device_chain_pem:
        chain_out.write_text(b.device_chain_pem)
    if crl_out is not None and b.crl_pem:
        crl_out.write_text(b.crl_pem)
    if as_jwks:
        _emit({"keys": [b.device_jwk]})
        return
    _emit({"enrolled": b.enrolled, "device_id": b.device_id, "device_jwk": b.device_jwk})


@click.group("status-list")
def status_list_group() -> None:
    """The signed Token Status List that tokens' ``status`` claim points at."""


@status_list_group.command("export")
@click.option("--out", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the status list JWT here, atomically (default: stdout).")
@json_option
@socket_option
def status_list_export(out: Path | None, as_json: bool, socket_path: str | None) -> None:
    """Fetch the daemon's signed status list (statuslist+jwt) for publication.

    Publish the file where relying parties poll it (e.g. a web server); it is
    signed by the device key, so the transport need not be trusted. Re-export
    at least as often as relying parties' max age, and after each revocation.
    """
    import os

    from badgeclient.client import WorkloadClient

    with WorkloadClient(socket_path) as w:
        jwt, uri = w.status_list()
    if out is not None:
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(jwt + "\n")
        os.replace(tmp, out)  # a poller never reads half a list
    if as_json:
        _emit({"status_list_jwt": jwt, "uri": uri, "out": str(out) if out else None})
    elif out is None:
        click.echo(jwt)
    else:
        click.echo(f"wrote {out} (uri {uri})", err=True)


credential_commands: tuple[click.Command, ...] = (
    assertion_command, attestation_command, dpop_command, csr_command, cert_command,
    trust_bundle_command, status_list_group,
)
COMMANDS = credential_commands  # same shape as badgeclient._cli.policy.COMMANDS
