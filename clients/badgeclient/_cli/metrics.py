"""``badgectl metrics``: the daemon's Prometheus metrics.

Over the admin socket by default (``[metrics] enabled = true``; operators
only, like every admin call), or from the HTTP endpoint of ``[metrics]
listen`` with ``--http ADDR`` (a socket path or 127.0.0.1:PORT). ``--json``
turns the text exposition into a list of metric families.
"""

from __future__ import annotations

import http.client
import os
import socket
from typing import Any

import click
import grpc

from badgeclient._cli.options import (
    EXIT_NO_ACCESS,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    about,
    admin_socket_option,
    emit_json,
    fail,
    json_option,
)
from badgeclient.errors import UnavailableError, from_rpc_error

SCRAPE = "/badged.v1.MetricsService/Scrape"


def scrape_admin(admin_socket: str | None, timeout: float = 10.0) -> str:
    """The exposition over the admin socket (raw bytes, no protobuf message)."""
    path = admin_socket or os.environ.get("BADGED_ADMIN_SOCKET") or "/run/badged/admin.sock"
    if not os.path.exists(path):
        raise UnavailableError(f"no badged socket at {path} (is the daemon running?)",
                               status="UNAVAILABLE")
    with grpc.insecure_channel(f"unix:{path}") as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            SCRAPE, request_serializer=None, response_deserializer=None)
        try:
            data: bytes = call(b"", timeout=timeout)
        except grpc.RpcError as err:
            if getattr(err, "code", lambda: None)() == grpc.StatusCode.UNIMPLEMENTED:
                fail(EXIT_REFUSED, "refused", "metrics are off on this daemon: set [metrics] "
                     "enabled = true (docs/badged.example.toml)",
                     as_json=bool(click.get_current_context().params.get("as_json")),
                     status="UNIMPLEMENTED", error_code="metrics_disabled")
            raise from_rpc_error(err) from None
    return data.decode()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def fetch(listen: str, timeout: float = 10.0) -> str:
    """GET /metrics from a socket path or host:port; raises OSError when unreachable."""
    conn: http.client.HTTPConnection
    if listen.startswith("/"):
        conn = _UnixHTTPConnection(listen, timeout)
    else:
        host, _, port = listen.rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read(16 * 1024 * 1024).decode()
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}: {body.strip()[:200]}")
        return body
    finally:
        conn.close()


def as_families(text: str) -> list[dict[str, Any]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [{"name": f.name, "type": f.type, "help": f.documentation,
             "samples": [{"name": s.name, "labels": dict(s.labels), "value": s.value}
                         for s in f.samples]}
            for f in text_string_to_metric_families(text)]


@click.command("metrics")
@click.option("--http", "listen", envvar="BADGED_METRICS", default=None,
              help="Read the HTTP endpoint of [metrics] listen instead (a socket path or "
                   "127.0.0.1:PORT) [env BADGED_METRICS].")
@json_option
@admin_socket_option
def metrics_command(listen: str | None, as_json: bool, admin_socket: str | None) -> None:
    """Print the daemon's Prometheus metrics (text exposition format, or --json)."""
    if listen is None:
        about("metrics")
        text = scrape_admin(admin_socket)
    else:
        about(f"metrics endpoint {listen}")
        try:
            text = fetch(listen)
        except PermissionError:
            fail(EXIT_NO_ACCESS, "no_access", f"permission denied on {listen}: only root, the "
                 "daemon's user and members of its operator_group may read metrics",
                 as_json=as_json, error_code="permission_denied")
        except (OSError, http.client.HTTPException) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            fail(EXIT_UNAVAILABLE, "unavailable", f"metrics endpoint {listen}: {why} (is "
                 "[metrics] listen set and the daemon running?)", as_json=as_json)
    if as_json:
        emit_json(as_families(text))
    else:
        click.echo(text, nl=False)
