"""``badgectl health``: each service's status, and why it is not serving.

Asks the standard gRPC health service on the admin socket; the daemon adds
the reasons there only (trailing metadata ``badged-health``, see
badged.service.health), because they name devices and file systems.
Exit code 0 when everything serves, 1 when something does not, 3 when the
daemon cannot be reached.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from grpc_health.v1 import health_pb2, health_pb2_grpc

from badgeclient._cli.options import admin_socket_option, json_option
from badgeclient.client import AdminClient

TRAILER = "badged-health"
_LABEL = {"": "(daemon)"}


def _detail(call: Any) -> dict[str, dict[str, Any]]:
    for key, value in call.trailing_metadata() or ():
        if key == TRAILER:
            doc = json.loads(value)
            if isinstance(doc, dict):
                return doc
    return {}


@click.command("health")
@json_option
@admin_socket_option
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="Seconds to wait for the daemon.")
def health_command(as_json: bool, admin_socket: str | None, timeout: float) -> None:
    """Show whether each service can issue now, with the reasons when not."""
    with AdminClient(admin_socket, timeout=timeout) as client:
        stub = health_pb2_grpc.HealthStub(client._channel)
        response, call = client._call(stub.Check.with_call, health_pb2.HealthCheckRequest())
    detail = _detail(call)
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    if not detail:  # a daemon without reasons: the overall status is all we know
        detail = {"": {"status": "SERVING" if serving else "NOT_SERVING", "reasons": []}}
    if as_json:
        click.echo(json.dumps(detail, indent=2, sort_keys=True))
    else:
        width = max(len(_LABEL.get(s, s)) for s in detail)
        for service in sorted(detail):
            entry = detail[service]
            click.echo(f"{_LABEL.get(service, service):<{width}}  {entry.get('status')}")
            for reason in entry.get("reasons", []):
                click.echo(f"{'':<{width}}    - {reason}")
    if not serving:
        sys.exit(1)
