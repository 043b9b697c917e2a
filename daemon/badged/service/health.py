"""The standard gRPC health service, plus the reasons for operators.

Statuses come from :class:`badged.health.HealthMonitor`. Anyone who can reach
a socket may ask for a status (that is what probes do); the *reasons* can
name file systems and devices, so they are attached -- as the trailing
metadata ``badged-health``, a JSON object ``{service: {"status", "reasons"}}``
-- only to a Check made on the admin socket (``badgectl health``).
"""

from __future__ import annotations

import json

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from badged.health import ServiceHealth
from badged.service.auth import caller_of
from badged.service.errors import Ctx

TRAILER = "badged-health"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_aio.HealthServicer):  # type: ignore[misc]  # untyped package
    def __init__(self) -> None:
        super().__init__()
        self._detail: dict[str, ServiceHealth] = {}

    async def publish(self, status: dict[str, ServiceHealth]) -> None:
        self._detail = dict(status)
        for service, health in status.items():
            await self.set(service, _SERVING if health.serving else _NOT_SERVING)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: Ctx) -> health_pb2.HealthCheckResponse:
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        peer = caller_of(context)
        if peer is not None and peer.channel == "admin" and self._detail:
            doc = {svc: {"status": "SERVING" if h.serving else "NOT_SERVING",
                         "reasons": list(h.reasons)} for svc, h in self._detail.items()}
            context.set_trailing_metadata(((TRAILER, json.dumps(doc, sort_keys=True)),))
        return response
