"""Options shared by every badgectl command module (one definition each), and
the little state ``main`` needs to report an error well: which socket was
used, what object the command was about, and whether ``--json`` was asked for.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

# Exit codes, documented in ``badgectl --help`` and the README; kept stable.
EXIT_OK = 0
EXIT_REFUSED = 1       # the daemon (or a check) said no: denied, not found, invalid file
EXIT_USAGE = 2         # bad arguments or an invalid request
EXIT_UNAVAILABLE = 3   # daemon not running, socket missing, token unavailable: retry later
EXIT_NO_ACCESS = 4     # not allowed to use the socket (e.g. not in the operator group)

EXIT_CODES_HELP = ("Exit codes: 0 ok; 1 refused (denied, not found, invalid file); 2 usage or "
                   "invalid request; 3 daemon unavailable (not running, no socket, token "
                   "unavailable); 4 no permission to use the socket (admin socket: be root, the "
                   "daemon's user, or in its operator group).")

_state: dict[str, Any] = {"socket": None, "subject": None, "admin": False}


def _remember_socket(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value or _state["socket"] is None:
        _state["admin"] = param.name == "admin_socket"
    if value:
        _state["socket"] = value
    elif _state["socket"] is None:  # a group's explicit value wins over a subcommand's default
        _state["socket"] = ("/run/badged/admin.sock" if param.name == "admin_socket"
                            else "/run/badged/agent.sock")
    return value


def about(subject: str) -> None:
    """Name the object this command is about, for error messages ("agent 'x'")."""
    _state["subject"] = subject


def current_socket() -> str | None:
    return _state["socket"]  # type: ignore[no-any-return]


def on_admin_socket() -> bool:
    return bool(_state["admin"])


def current_subject() -> str | None:
    return _state["subject"]  # type: ignore[no-any-return]


def emit_json(doc: Any) -> None:
    """Every ``--json`` output: one JSON document on stdout, keys sorted."""
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def fail(code: int, kind: str, message: str, *, as_json: bool, status: str = "",
         error_code: str = "") -> NoReturn:
    """The one way badgectl reports an error: ``badgectl: message`` on stderr, or,
    under ``--json``, ``{"error": {...}}`` on stdout so a script parses one stream."""
    if as_json:
        emit_json({"error": {"kind": kind, "message": message, "status": status,
                             "code": error_code, "exit_code": code}})
    else:
        click.echo(f"badgectl: {message}", err=True)
    sys.exit(code)


socket_option = click.option(
    "--socket", "socket_path", envvar="BADGED_SOCKET", default=None, callback=_remember_socket,
    help="Workload socket [env BADGED_SOCKET; default /run/badged/agent.sock].")
admin_socket_option = click.option(
    "--admin-socket", "admin_socket", envvar="BADGED_ADMIN_SOCKET", default=None,
    callback=_remember_socket,
    help="Admin socket [env BADGED_ADMIN_SOCKET; default /run/badged/admin.sock].")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Machine-readable output (errors too: {\"error\": {...}}).")
