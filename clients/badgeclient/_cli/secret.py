"""``badgectl secret set|rotate|delete|list``: the credential proxy's static secrets.

The value is read from stdin (or ``--file``), never from argv: argv is
readable by every local user in ``/proc/PID/cmdline`` and lands in shell
history. One trailing newline is dropped. The daemon seals it under a key in
the token; nothing can read it back (``list`` shows names and versions).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from badgeclient._cli.options import (
    EXIT_USAGE,
    about,
    admin_socket_option,
    emit_json,
    fail,
    json_option,
)
from badgeclient.client import DEFAULT_ADMIN_SOCKET, _Base
from badged_proto.v1 import secrets_pb2, secrets_pb2_grpc

MAX_VALUE = 8192


class SecretClient(_Base):
    """SecretService on the admin socket (operators only)."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = 30.0) -> None:
        super().__init__(socket_path or os.environ.get("BADGED_ADMIN_SOCKET")
                         or DEFAULT_ADMIN_SOCKET, timeout)
        self._stub = secrets_pb2_grpc.SecretServiceStub(self._channel)

    def set(self, name: str, value: bytes, *, rotate: bool) -> secrets_pb2.SecretInfo:
        return self._call(self._stub.SetSecret,
                          secrets_pb2.SetSecretRequest(name=name, value=value, rotate=rotate))

    def delete(self, name: str) -> secrets_pb2.SecretInfo:
        return self._call(self._stub.DeleteSecret, secrets_pb2.DeleteSecretRequest(name=name))

    def list(self) -> list[secrets_pb2.SecretInfo]:
        return list(self._call(self._stub.ListSecrets, secrets_pb2.ListSecretsRequest()).secrets)


def _read_value(file: Path | None, as_json: bool) -> bytes:
    if file is not None:
        data = file.read_bytes()[:MAX_VALUE + 3]
    elif sys.stdin.isatty():
        data = click.prompt("secret value", hide_input=True, err=True).encode()
    else:
        data = sys.stdin.buffer.read(MAX_VALUE + 3)
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        fail(EXIT_USAGE, "usage", "empty secret value (give it on stdin or with --file)",
             as_json=as_json)
    return data


def _show(info: secrets_pb2.SecretInfo, as_json: bool) -> None:
    if as_json:
        emit_json({"name": info.name, "version": info.version, "state": info.state,
                   "created_at": info.created_at, "updated_at": info.updated_at})
    else:
        click.echo(f"{info.name}\tversion {info.version}\t{info.state}")


@click.group("secret")
def secret_group() -> None:
    """Static secrets (API keys) the proxy attaches for agents; write-only."""


def _value_command(name: str, rotate: bool, help_text: str) -> click.Command:
    @click.command(name, help=help_text)
    @click.argument("secret_name", metavar="NAME")
    @click.option("--file", "file", type=click.Path(path_type=Path, dir_okay=False,
                                                   exists=True),
                  help="Read the value from this file instead of stdin.")
    @json_option
    @admin_socket_option
    def command(secret_name: str, file: Path | None, as_json: bool,
                admin_socket: str | None) -> None:
        about(f"secret {secret_name!r}")
        value = _read_value(file, as_json)
        with SecretClient(admin_socket) as client:
            _show(client.set(secret_name, value, rotate=rotate), as_json)

    return command


secret_group.add_command(_value_command(
    "set", False, "Create secret NAME from stdin (or --file); refused if it exists."))
secret_group.add_command(_value_command(
    "rotate", True, "Replace secret NAME from stdin (or --file); the next call uses it."))


@secret_group.command("delete")
@click.argument("secret_name", metavar="NAME")
@json_option
@admin_socket_option
def secret_delete(secret_name: str, as_json: bool, admin_socket: str | None) -> None:
    """Delete secret NAME (routes using it are refused from the next call)."""
    about(f"secret {secret_name!r}")
    with SecretClient(admin_socket) as client:
        _show(client.delete(secret_name), as_json)


@secret_group.command("list")
@json_option
@admin_socket_option
def secret_list(as_json: bool, admin_socket: str | None) -> None:
    """Names and versions of the stored secrets (never a value)."""
    with SecretClient(admin_socket) as client:
        items = client.list()
    if as_json:
        emit_json([{"name": i.name, "version": i.version, "created_at": i.created_at,
                    "updated_at": i.updated_at} for i in items])
        return
    for info in items:
        _show(info, False)
