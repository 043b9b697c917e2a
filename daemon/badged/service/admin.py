"""Admin service: agent lifecycle, for operators on the admin socket only."""

from __future__ import annotations

from typing import Any

from badged.attest.process import ProcessAttributes
from badged.identity.registry import check_agent_name
from badged.service.auth import require_operator, resolve_caller
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx
from badged.service.marshal import agent_to_pb
from badged_proto.v1 import admin_pb2, admin_pb2_grpc


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps

    def _operator(self, context: Ctx) -> ProcessAttributes:
        _, proc = resolve_caller(self._d, context, "admin")
        require_operator(self._d, proc)
        return proc

    async def _audit(self, event: str, proc: ProcessAttributes, agent: str, **extra: Any) -> None:
        await self._d.audit.append({"event": event, "agent": agent, "caller": proc.summary(),
                                    "decision": "allow", **extra})

    def _now(self) -> int:
        return int(self._d.clock())

    async def CreateAgent(self, request: admin_pb2.CreateAgentRequest,
                          context: Ctx) -> admin_pb2.Agent:
        proc = self._operator(context)
        rec = self._d.agents.create(check_agent_name(request.name), request.description)
        await self._audit("agent.created", proc, rec.name, kid=rec.current.token_kid)
        return agent_to_pb(rec, self._now())

    async def ListAgents(self, request: admin_pb2.ListAgentsRequest,
                         context: Ctx) -> admin_pb2.ListAgentsResponse:
        self._operator(context)
        now = self._now()
        return admin_pb2.ListAgentsResponse(
            agents=[agent_to_pb(a, now) for a in self._d.agents.list(request.include_revoked)])

    async def GetAgent(self, request: admin_pb2.GetAgentRequest,
                       context: Ctx) -> admin_pb2.Agent:
        self._operator(context)
        return agent_to_pb(self._d.agents.get(check_agent_name(request.name)), self._now())

    async def RotateAgent(self, request: admin_pb2.RotateAgentRequest,
                          context: Ctx) -> admin_pb2.Agent:
        proc = self._operator(context)
        rec = self._d.agents.rotate(check_agent_name(request.name))
        await self._audit("agent.rotated", proc, rec.name, version=rec.current.version,
                          kid=rec.current.token_kid)
        return agent_to_pb(rec, self._now())

    async def RevokeAgent(self, request: admin_pb2.RevokeAgentRequest,
                          context: Ctx) -> admin_pb2.Agent:
        proc = self._operator(context)
        rec = self._d.agents.revoke(check_agent_name(request.name), request.reason)
        await self._audit("agent.revoked", proc, rec.name, reason=request.reason[:256])
        return agent_to_pb(rec, self._now())
