"""Workload service: thin handlers over attestation → policy → minting → audit.

Order per request (the folder layout follows it): resolve the caller from the
relay registry and /proc (``auth``), decide (``policy``), sign in the token
(``core`` + ``keystore``), make the audit record durable, and only then
answer. A credential whose audit record could not be written is never sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from cryptography.hazmat.primitives import serialization

from badged.attest.process import ProcessAttributes
from badged.core.signing import signed_message
from badged.core.tokens import ES256, build_claims, mint_token
from badged.errors import BadgedError, FailedPreconditionError, PolicyDeniedError
from badged.policy.model import Decision, Request, candidates, evaluate, missing_selectors
from badged.service import validate
from badged.service.auth import resolve_caller
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx
from badged_proto.v1 import workload_pb2, workload_pb2_grpc

_logger = logging.getLogger(__name__)


class WorkloadServicer(workload_pb2_grpc.WorkloadServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps

    async def FetchToken(self, request: workload_pb2.FetchTokenRequest,
                         context: Ctx) -> workload_pb2.FetchTokenResponse:
        d = self._d
        audience = validate.audience(request.audience)
        scopes = validate.scopes(list(request.scopes))
        ttl = validate.ttl(request.ttl_seconds)
        agent = validate.agent_name(request.agent)
        _, proc = resolve_caller(d, context, "workload")
        req = Request(kind="token", agent=agent, audience=audience, scopes=scopes, ttl=ttl)
        decision = await self._decide(proc, req)
        assert decision.agent is not None
        key = self._key(decision, d.agents.token_key)
        now = d.clock()
        claims = build_claims(issuer=d.issuer, subject=key.spiffe_id, audience=audience,
                              scopes=scopes, ttl_seconds=decision.ttl, now=now, jti=d.new_jti())
        issued = mint_token(claims=claims, key=key.handle, key_id=key.kid)
        await d.audit.append({
            "event": "token.issued", "agent": key.agent, "caller": proc.summary(),
            "request": {"audience": audience, "scopes": list(scopes), "ttl": decision.ttl},
            "decision": "allow", "rule": decision.rule, "jti": issued.jti, "kid": key.kid,
            "credential_sha256": hashlib.sha256(issued.token.encode()).hexdigest(),
            "exp": issued.expires_at,
        })
        return workload_pb2.FetchTokenResponse(
            token=issued.token, agent=key.agent, spiffe_id=key.spiffe_id,
            issued_at=issued.issued_at, expires_at=issued.expires_at, jti=issued.jti,
            key_id=issued.key_id,
        )

    async def Sign(self, request: workload_pb2.SignRequest,
                   context: Ctx) -> workload_pb2.SignResponse:
        d = self._d
        message = signed_message(request.context, request.data)
        agent = validate.agent_name(request.agent)
        _, proc = resolve_caller(d, context, "workload")
        decision = await self._decide(proc, Request(kind="sign", agent=agent))
        key = self._key(decision, d.agents.sign_key)
        signature = key.handle.sign(message, ES256)
        await d.audit.append({
            "event": "signature.issued", "agent": key.agent, "caller": proc.summary(),
            "request": {"context": request.context, "data_len": len(request.data),
                        "data_sha256": hashlib.sha256(request.data).hexdigest()},
            "decision": "allow", "rule": decision.rule, "kid": key.kid,
        })
        pem = key.handle.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        return workload_pb2.SignResponse(
            signature=signature, algorithm="ECDSA_P256_SHA256", key_id=key.kid,
            signed_message=message, public_key_pem=pem, agent=key.agent,
        )

    async def GetJwks(self, request: workload_pb2.GetJwksRequest,
                      context: Ctx) -> workload_pb2.GetJwksResponse:
        # Public keys are public: served to any caller, attested or not.
        return workload_pb2.GetJwksResponse(jwks_json=json.dumps(self._d.agents.jwks()))

    async def WhoAmI(self, request: workload_pb2.WhoAmIRequest,
                     context: Ctx) -> workload_pb2.WhoAmIResponse:
        d = self._d
        _, proc = resolve_caller(d, context, "workload")
        selectors = proc.selectors()
        policy = d.policy.current
        matches = []
        for b in candidates(policy, selectors):
            status = self._agent_status(b.agent)
            if status != "active":
                continue
            matches.append(workload_pb2.AgentMatch(
                agent=b.agent, spiffe_id=d.agents.spiffe_id(b.agent), rule=b.source,
                audiences=sorted(b.audiences), scopes=sorted(b.scopes),
                max_ttl_seconds=b.max_ttl, kinds=sorted(b.kinds)))
        misses = [
            workload_pb2.RuleMiss(
                agent=b.agent, rule=b.source,
                reason="missing selectors: " + ", ".join(missing_selectors(b, selectors)))
            for b in policy.bindings if not b.matches(selectors)
        ]
        return workload_pb2.WhoAmIResponse(
            process=workload_pb2.ProcessInfo(
                pid=proc.pid, uid=proc.uid, gid=proc.gid, groups=list(proc.groups),
                exe=proc.exe or "", exe_sha256=proc.exe_sha256 or "", cgroup=proc.cgroup or "",
                selectors=sorted(selectors)),
            agents=matches, misses=misses)

    # -- helpers -------------------------------------------------------------------

    def _agent_status(self, name: str) -> str:
        try:
            return self._d.agents.get(name).status
        except BadgedError:
            return "missing"

    async def _decide(self, proc: ProcessAttributes, req: Request) -> Decision:
        d = self._d
        decision = evaluate(d.policy.current, proc.selectors(), req, default_ttl=d.default_ttl)
        if decision.allowed and decision.agent is not None:
            status = self._agent_status(decision.agent)
            if status != "active":
                decision = Decision(False, decision.agent, decision.rule, f"agent is {status}")
        if not decision.allowed:
            await d.audit.append({
                "event": f"{req.kind}.denied", "agent": decision.agent, "caller": proc.summary(),
                "request": _request_summary(req), "decision": "deny", "rule": decision.rule,
                "reason": decision.reason,
            })
            _logger.info("denied", extra={"agent": decision.agent, "uid": proc.uid,
                                          "pid": proc.pid, "rule": decision.rule,
                                          "reason": decision.reason})
            raise PolicyDeniedError(decision.reason, public=_public_reason(decision))
        return decision

    def _key(self, decision: Decision, getter: Any) -> Any:
        try:
            return getter(decision.agent)
        except FailedPreconditionError:
            # Revoked between decision and signing: refuse like any denial.
            raise PolicyDeniedError(f"agent {decision.agent} revoked",
                                    public="agent is revoked") from None


def _request_summary(req: Request) -> dict[str, Any]:
    return {"kind": req.kind, "agent": req.agent, "audience": req.audience,
            "scopes": list(req.scopes), "ttl": req.ttl}


def _public_reason(decision: Decision) -> str:
    """A caller-safe phrase: what was wrong with *its own* request, no rule text."""
    reason = decision.reason
    for needle, phrase in (
        ("agent is revoked", "agent is revoked"),
        ("agent is missing", "agent does not exist"),
        ("several agents", "caller may act as several agents; name one with agent="),
        ("audience", "audience not allowed for this agent"),
        ("scopes", "scope not allowed for this agent"),
        ("ttl", "ttl above this agent's cap"),
        ("kind", "operation not allowed for this agent"),
    ):
        if needle in reason:
            return f"denied by policy: {phrase}"
    return "denied by policy: no identity for this caller"
