"""``badgectl``: the operator and agent CLI. Talks to badged only through
the public client library, and maps every client error to one message and
exit code in one place (``main``).

Exit codes (``options.EXIT_*``): 0 ok, 1 refused, 2 usage or invalid request,
3 daemon unavailable, 4 no permission to use the socket. With ``--json``
every command prints one JSON document on stdout, errors included
(``{"error": {"kind", "message", "status", "code", "exit_code"}}``).
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import asdict
from typing import Any

import click

from badgeclient._cli.credentials import context_option, parse_context
from badgeclient._cli.options import (
    EXIT_CODES_HELP,
    EXIT_NO_ACCESS,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    about,
    admin_socket_option,
    current_socket,
    current_subject,
    emit_json,
    fail,
    json_option,
    on_admin_socket,
    socket_option,
)
from badgeclient.client import AdminClient, AgentInfo, WorkloadClient
from badgeclient.errors import BadgeError, InvalidRequestError, UnavailableError


def _ts(epoch: int) -> str:
    if not epoch:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_emit_json = emit_json


@click.group(epilog=EXIT_CODES_HELP)
@click.version_option(package_name="badged", prog_name="badgectl")
def cli() -> None:
    """badgectl: fetch credentials from badged and manage agent identities.

    Shell completion (bash): eval "$(_BADGECTL_COMPLETE=bash_source badgectl)"
    (zsh: zsh_source, fish: fish_source).
    """


# -- agent-side commands ---------------------------------------------------------


@cli.command()
@click.option("--audience", "-a", required=True, help="Token audience (aud).")
@click.option("--scope", "-s", "scopes", multiple=True, help="Requested scope; repeatable.")
@click.option("--ttl", type=int, default=0, help="Lifetime in seconds (0 = daemon default).")
@click.option("--agent", default=None, help="Agent to act as, if the caller maps to several.")
@click.option("--delegation", default=None, help="Act for a user under this delegation id.")
@click.option("--reason", default="", help="Why; shown to the operator if approval is needed.")
@click.option("--dpop", "dpop_bound", is_flag=True,
              help="Bind the token to the agent's DPoP key (cnf.jkt, RFC 9449).")
@click.option("--json", "as_json", is_flag=True, help="Print the token and its metadata as JSON.")
@context_option
@click.option("--traceparent", default="", envvar="TRACEPARENT",
              help="W3C traceparent of the caller's span (default: $TRACEPARENT).")
@socket_option
def token(audience: str, scopes: tuple[str, ...], ttl: int, agent: str | None,
          delegation: str | None, reason: str, dpop_bound: bool, as_json: bool,
          context: tuple[str, ...], traceparent: str, socket_path: str | None) -> None:
    """Fetch a short-lived access token (JWT) for this process's agent identity."""
    with WorkloadClient(socket_path) as client:
        tok = client.fetch_token(audience=audience, scopes=scopes, ttl_seconds=ttl, agent=agent,
                                 delegation=delegation, reason=reason, dpop_bound=dpop_bound,
                                 context=parse_context(context), traceparent=traceparent)
    if as_json:
        _emit_json({"token": tok.token, "agent": tok.agent, "spiffe_id": tok.spiffe_id,
                    "jti": tok.jti, "kid": tok.key_id, "issued_at": tok.issued_at,
                    "expires_at": tok.expires_at, "txn": tok.txn})
    else:
        click.echo(tok.token)


@cli.command()
@json_option
@socket_option
def jwks(as_json: bool, socket_path: str | None) -> None:
    """Print the JWK Set of every active agent token key (always JSON)."""
    with WorkloadClient(socket_path) as client:
        _emit_json(client.jwks())


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@socket_option
def whoami(as_json: bool, socket_path: str | None) -> None:
    """Show how the daemon sees this process and which identities it may use."""
    with WorkloadClient(socket_path) as client:
        me = client.whoami()
    if as_json:
        _emit_json(asdict(me))
        return
    click.echo(f"process: pid={me.pid} uid={me.uid} gid={me.gid}")
    click.echo(f"exe:     {me.exe or '(not readable by the daemon)'}")
    if me.exe_sha256:
        click.echo(f"sha256:  {me.exe_sha256}")
    if not me.agents:
        click.echo("agents:  none -- no policy binding matches this process (deny by default)")
    for a in me.agents:
        click.echo(f"agent:   {a.agent} ({a.spiffe_id}) assurance={a.assurance or '-'}")
        click.echo(f"  because {a.rule}; kinds={','.join(a.kinds)} "
                   f"audiences={','.join(a.audiences)} scopes={','.join(a.scopes) or '-'} "
                   f"max_ttl={a.max_ttl_seconds}s")
    for m in me.misses:
        click.echo(f"not:     {m['agent']} ({m['rule']}): {m['reason']}")


@cli.command()
@click.option("--context", default="", help="Application label bound into the signature.")
@click.option("--agent", default=None)
@click.option("--in", "infile", type=click.File("rb"), default="-",
              help="Data to sign (default: stdin).")
@json_option
@socket_option
def sign(context: str, agent: str | None, infile: Any, as_json: bool,
         socket_path: str | None) -> None:
    """Sign data with this agent's signing key (never its token key); prints JSON."""
    data = infile.read(64 * 1024 + 1)
    with WorkloadClient(socket_path) as client:
        sig = client.sign(data, context=context, agent=agent)
    import base64

    _emit_json({"agent": sig.agent, "algorithm": sig.algorithm, "kid": sig.key_id,
                "signature": base64.b64encode(sig.signature).decode(),
                "signed_message_prefix": base64.b64encode(
                    sig.signed_message[: len(sig.signed_message) - len(data)]).decode(),
                "public_key_pem": sig.public_key_pem})


# -- operator commands -----------------------------------------------------------


@cli.group()
def agent() -> None:
    """Create, list, show, rotate and revoke agent identities (admin socket)."""


def _print_agent(a: AgentInfo, as_json: bool) -> None:
    if as_json:
        _emit_json(asdict(a))
        return
    click.echo(f"{a.name}  {a.status}  {a.spiffe_id}")
    if a.assurance:
        click.echo(f"  assurance {a.assurance}")
    click.echo(f"  created {_ts(a.created_at)}"
               + (f", revoked {_ts(a.revoked_at)} ({a.revoke_reason or 'no reason'})"
                  if a.revoked_at else ""))
    for k in a.keys:
        extra = f" published until {_ts(k.publish_until)}" if k.state == "retired" else ""
        click.echo(f"  v{k.version} {k.state:<8} token kid {k.token_kid}{extra}")


@agent.command("create")
@click.argument("name")
@click.option("--description", default="")
@click.option("--json", "as_json", is_flag=True)
@admin_socket_option
def agent_create(name: str, description: str, as_json: bool, admin_socket: str | None) -> None:
    """Create an agent identity with fresh keys in the token."""
    about(f"agent {name!r}")
    with AdminClient(admin_socket) as client:
        _print_agent(client.create_agent(name, description), as_json)


@agent.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked agents.")
@click.option("--json", "as_json", is_flag=True)
@admin_socket_option
def agent_list(include_revoked: bool, as_json: bool, admin_socket: str | None) -> None:
    """List agent identities."""
    with AdminClient(admin_socket) as client:
        agents = client.list_agents(include_revoked)
    if as_json:
        _emit_json([asdict(a) for a in agents])
        return
    if not agents:
        click.echo("no agents")
    for a in agents:
        click.echo(f"{a.name:<24} {a.status:<8} v{a.current_version:<3} {a.spiffe_id}")


@agent.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@admin_socket_option
def agent_show(name: str, as_json: bool, admin_socket: str | None) -> None:
    """Show one agent, its key versions and their publication window."""
    about(f"agent {name!r}")
    with AdminClient(admin_socket) as client:
        _print_agent(client.get_agent(name), as_json)


@agent.command("rotate")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@admin_socket_option
def agent_rotate(name: str, as_json: bool, admin_socket: str | None) -> None:
    """New key version; the old public key stays published until its tokens expire."""
    about(f"agent {name!r}")
    with AdminClient(admin_socket) as client:
        _print_agent(client.rotate_agent(name), as_json)


@agent.command("revoke")
@click.argument("name")
@click.option("--reason", default="")
@click.option("--json", "as_json", is_flag=True)
@admin_socket_option
def agent_revoke(name: str, reason: str, as_json: bool, admin_socket: str | None) -> None:
    """Revoke: keys destroyed in the token, every later request refused."""
    about(f"agent {name!r}")
    with AdminClient(admin_socket) as client:
        _print_agent(client.revoke_agent(name, reason), as_json)


def _register_commands() -> None:
    """Command groups that live in their own modules, registered in one place."""
    from badgeclient._cli.audit import audit_group
    from badgeclient._cli.ca import ca_group
    from badgeclient._cli.credentials import COMMANDS as CREDENTIAL_COMMANDS
    from badgeclient._cli.enroll import enroll_group
    from badgeclient._cli.health import health_command
    from badgeclient._cli.metrics import metrics_command
    from badgeclient._cli.policy import COMMANDS as POLICY_COMMANDS
    from badgeclient._cli.proxy import proxy_group
    from badgeclient._cli.secret import secret_group
    from badgeclient._cli.ssh import ssh_group
    from badgeclient._cli.verify import verify_command

    for command in (*POLICY_COMMANDS, *CREDENTIAL_COMMANDS):
        cli.add_command(command)
    cli.add_command(audit_group, "audit")
    cli.add_command(enroll_group, "enroll")
    cli.add_command(ca_group, "ca")
    cli.add_command(verify_command, "verify")
    cli.add_command(health_command, "health")
    cli.add_command(metrics_command, "metrics")
    cli.add_command(ssh_group, "ssh")
    cli.add_command(proxy_group, "proxy")
    cli.add_command(secret_group, "secret")


_register_commands()


def _wants_json(argv: list[str]) -> bool:
    args = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in args


_fail = fail


def _message(exc: BadgeError, label: str) -> str:
    """``agent 'x': not found`` -- never ``not found: not found``."""
    text = exc.message.strip()
    if text.lower().startswith(label):
        text = text[len(label):].lstrip(" :") or ""
    subject = current_subject()
    parts = [p for p in (subject, label, text) if p]
    head = f"{parts[0]}: " if subject else ""
    rest = parts[1:] if subject else parts
    return head + ": ".join(rest)


def _is_permission_problem(exc: BadgeError) -> bool:
    return "permission denied" in exc.message.lower() and isinstance(exc, UnavailableError)


def main() -> None:
    as_json = _wants_json(sys.argv[1:])
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        _fail(130, "aborted", "aborted", as_json=as_json)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:
        # badgectl ships with badgeclient; its offline operator commands (ca,
        # policy check, audit verify/export) run the daemon's code (issue 18).
        if exc.name != "badged" and not (exc.name or "").startswith("badged."):
            raise
        _fail(EXIT_USAGE, "needs_daemon", "this command runs the daemon's own code: "
              "install badged next to badgeclient", as_json=as_json)
    except click.ClickException as exc:
        if not as_json:
            exc.show()
            sys.exit(EXIT_USAGE if exc.exit_code == 2 else exc.exit_code)
        _fail(EXIT_USAGE if exc.exit_code == 2 else exc.exit_code, "usage", exc.format_message(),
              as_json=True)
    except UnavailableError as exc:
        sock = current_socket() or "the socket"
        if _is_permission_problem(exc):
            why = ("only root, the daemon's user and members of its operator_group may use it"
                   if on_admin_socket() else "its directory or mode keeps this user out")
            _fail(EXIT_NO_ACCESS, "no_access", f"permission denied on {sock}: {why}",
                  as_json=as_json, status=exc.status, error_code="permission_denied")
        _fail(EXIT_UNAVAILABLE, "unavailable", _message(exc, "unavailable"), as_json=as_json,
              status=exc.status, error_code=exc.code)
    except InvalidRequestError as exc:
        _fail(EXIT_USAGE, "invalid_request", _message(exc, "invalid request"), as_json=as_json,
              status=exc.status, error_code=exc.code)
    except BadgeError as exc:
        label = (exc.status or type(exc).__name__).lower().replace("_", " ")
        _fail(EXIT_REFUSED, "refused", _message(exc, label), as_json=as_json, status=exc.status,
              error_code=exc.code)


if __name__ == "__main__":
    main()
