"""``badgectl metrics``: the daemon's Prometheus metrics, from its metrics endpoint.

The daemon serves them only when ``[metrics] listen`` is set: on a Unix socket
(mode 0600, or 0660 for the operator group, like the admin socket) or on a
loopback TCP port. ``--json`` turns the exposition into a list of families.
"""

from __future__ import annotations

import http.client
import socket
from typing import Any

import click

from badgeclient._cli.options import (
    EXIT_NO_ACCESS,
    EXIT_UNAVAILABLE,
    about,
    emit_json,
    fail,
    json_option,
)

DEFAULT = "/run/badged/metrics.sock"


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
@click.option("--metrics-socket", "listen", envvar="BADGED_METRICS", default=DEFAULT,
              show_default=True,
              help="The daemon's [metrics] listen: a socket path or 127.0.0.1:PORT "
                   "[env BADGED_METRICS].")
@json_option
def metrics_command(listen: str, as_json: bool) -> None:
    """Print the daemon's Prometheus metrics (text exposition format, or --json)."""
    about(f"metrics endpoint {listen}")
    try:
        text = fetch(listen)
    except PermissionError:
        fail(EXIT_NO_ACCESS, "no_access", f"permission denied on {listen}: only root, the "
             "daemon's user and members of its operator_group may read metrics",
             as_json=as_json, error_code="permission_denied")
    except (OSError, http.client.HTTPException) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        fail(EXIT_UNAVAILABLE, "unavailable", f"metrics endpoint {listen}: {why} (is [metrics] "
             "listen set and the daemon running?)", as_json=as_json)
    if as_json:
        emit_json(as_families(text))
    else:
        click.echo(text, nl=False)
