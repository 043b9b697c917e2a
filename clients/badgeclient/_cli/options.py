"""Options shared by every badgectl command module (one definition each)."""

from __future__ import annotations

import click

socket_option = click.option(
    "--socket", "socket_path", envvar="BADGED_SOCKET", default=None,
    help="Workload socket [env BADGED_SOCKET; default /run/badged/agent.sock].")
admin_socket_option = click.option(
    "--admin-socket", "admin_socket", envvar="BADGED_ADMIN_SOCKET", default=None,
    help="Admin socket [env BADGED_ADMIN_SOCKET; default /run/badged/admin.sock].")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
