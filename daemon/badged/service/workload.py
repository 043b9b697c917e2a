"""Workload service: thin handlers over attestation → policy → minting → audit.

Order per request (the folder layout follows it): resolve the caller from the
connection's peer credentials and /proc (``auth``), decide (``policy``: bundles, step-ups,
delegation, rate budget, approval), sign in the token (``core`` +
``keystore``), make the audit record durable, and only then answer. A
credential whose audit record could not be written is never sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pwd
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization

from badged.attest.process import ProcessAttributes
from badged.core.signing import signed_message
from badged.core.tokens import ES256, build_claims, mint_token
from badged.errors import (
    BadgedError,
    FailedPreconditionError,
    InvalidRequestError,
    PolicyDeniedError,
    RateLimitedError,
)
from badged.identity.registry import SigningKey
from badged.listener.peers import PeerCredentials
from badged.policy.loader import parse_duration
from badged.policy.model import (
    Bundle,
    Decision,
    Request,
    bundles_in_effect,
    candidates,
    evaluate,
    may_delegate,
    missing_selectors,
)
from badged.service import validate
from badged.service.approvals import PendingApproval
from badged.service.auth import resolve_caller
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx
from badged_proto.v1 import workload_pb2, workload_pb2_grpc

_logger = logging.getLogger(__name__)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid-{uid}"


class PolicyGate:
    """Decide, enforce budget and approval, audit denials. Shared by servicers."""

    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps

    def decide(self, proc: ProcessAttributes, req: Request, *, consume: bool = True) -> Decision:
        d = self._d
        now = d.clock()

        def budget(agent: str, bundle: Bundle) -> float | None:
            return d.limiter.wait_time(agent, bundle, now)

        decision = evaluate(d.policy.current, proc.selectors(), req, now=now,
                            default_ttl=d.default_ttl, max_ttl=d.max_ttl, grants=d.grants.grants(),
                            delegations=d.grants.delegations(), budget=budget)
        if decision.allowed and decision.agent is not None:
            status = self.agent_status(decision.agent)
            if status != "active":
                decision = Decision(False, decision.agent, decision.rule, f"agent is {status}",
                                    trace=decision.trace)
        if decision.allowed and consume and decision.bundle is not None:
            bundle = self._bundle(decision.bundle)
            if bundle is not None and decision.agent is not None:
                d.limiter.consume(decision.agent, bundle, now)
        return decision

    def _bundle(self, name: str) -> Bundle | None:
        policy = self._d.policy.current
        if policy.baseline is not None and policy.baseline.name == name:
            return policy.baseline
        return policy.bundles.get(name)

    def agent_status(self, name: str) -> str:
        try:
            return self._d.agents.get(name).status
        except BadgedError:
            return "missing"

    async def enforce(self, proc: ProcessAttributes, peer: PeerCredentials, req: Request,
                      reason: str = "") -> tuple[Decision, PendingApproval | None]:
        d = self._d
        decision = self.decide(proc, req)
        if not decision.allowed:
            await d.audit.append({
                "event": f"{req.kind}.denied", "agent": decision.agent,
                "caller": proc.summary(), "request": _request_summary(req),
                "decision": "deny", "rule": decision.rule, "reason": decision.reason,
                "trace": list(decision.trace),
            })
            _logger.info("denied", extra={"agent": decision.agent, "uid": proc.uid,
                                          "pid": proc.pid, "explain": decision.explain(),
                                          "trace": "; ".join(decision.trace)})
            if decision.retry_after is not None:
                raise RateLimitedError(decision.reason, retry_after=decision.retry_after)
            raise PolicyDeniedError(decision.reason, public=_public_reason(decision))
        approval = None
        if decision.approval_required:
            _logger.info("approval required", extra={"agent": decision.agent,
                                                     "bundle": decision.bundle})
            try:
                approval = await d.approvals.request(decision, req, reason, proc, peer)
            except PolicyDeniedError as exc:
                await d.audit.append({
                    "event": "approval.refused", "agent": decision.agent,
                    "caller": proc.summary(), "request": _request_summary(req),
                    "decision": "deny", "rule": decision.rule, "reason": exc.detail,
                })
                raise
            await d.audit.append({
                "event": "approval.granted", "agent": decision.agent, "approval": approval.id,
                "approved_by": approval.decided_by, "request": _request_summary(req),
                "caller": proc.summary(), "decision": "allow", "rule": decision.rule,
            })
        return decision, approval

    def key(self, decision: Decision, getter: Callable[[str], SigningKey]) -> SigningKey:
        assert decision.agent is not None
        try:
            return getter(decision.agent)
        except FailedPreconditionError:
            # Revoked between decision and signing: refuse like any denial.
            raise PolicyDeniedError(f"agent {decision.agent} revoked",
                                    public="denied by policy: agent is revoked") from None


class WorkloadServicer(workload_pb2_grpc.WorkloadServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps
        self._gate = PolicyGate(deps)
        self._pems: dict[str, str] = {}

    def _public_pem(self, key: SigningKey) -> str:
        """The key's SPKI PEM, encoded once per key instead of once per Sign (~6 µs).

        Keyed by kid, the RFC 7638 thumbprint of that very public key, so an
        entry can never describe another key; a rotated key has a new kid.
        """
        pem = self._pems.get(key.kid)
        if pem is None:
            pem = key.handle.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
            if len(self._pems) >= 1024:
                self._pems.clear()
            self._pems[key.kid] = pem
        return pem

    async def FetchToken(self, request: workload_pb2.FetchTokenRequest,
                         context: Ctx) -> workload_pb2.FetchTokenResponse:
        d = self._d
        audience = validate.audience(request.audience)
        scopes = validate.scopes(list(request.scopes))
        ttl = validate.ttl(request.ttl_seconds)
        agent = validate.agent_name(request.agent)
        delegation_id = validate.opaque_id(request.delegation, "delegation")
        reason = validate.reason(request.reason)
        peer, proc = resolve_caller(d, context, "workload")
        req = Request(kind="token", agent=agent, audience=audience, scopes=scopes, ttl=ttl,
                      delegation=delegation_id)
        decision, approval = await self._gate.enforce(proc, peer, req, reason)
        key = self._gate.key(decision, d.tokens.token_key)
        extra: dict[str, Any] = {}
        subject = key.spiffe_id
        if decision.delegation is not None:
            # RFC 8693: the token is about the user, acted on by the agent.
            subject = f"spiffe://{d.trust_domain}/user/{decision.delegation.user}"
            extra["act"] = {"sub": key.spiffe_id}
        if request.dpop_bound:
            # Proofs are signed by the hardware token key (also in session
            # mode), so the binding names that key's RFC 7638 thumbprint.
            extra["cnf"] = {"jkt": d.agents.token_key(key.agent).kid}
        if approval is not None:
            extra["approval"] = {"id": approval.id, "by": approval.decided_by,
                                 "at": int(approval.decided_at)}
        claims = build_claims(issuer=d.issuer, subject=subject, audience=audience,
                              scopes=scopes, ttl_seconds=decision.ttl, now=d.clock(),
                              jti=d.new_jti(), extra=extra)
        issued = await d.signing.run(
            lambda: mint_token(claims=claims, key=key.handle, key_id=key.kid))
        await d.audit.append({
            "event": "token.issued", "agent": key.agent, "caller": proc.summary(),
            "request": {"audience": audience, "scopes": list(scopes), "ttl": decision.ttl},
            "decision": "allow", "rule": decision.rule, "bundle": decision.bundle,
            "jti": issued.jti, "kid": key.kid, "exp": issued.expires_at,
            "credential_sha256": hashlib.sha256(issued.token.encode()).hexdigest(),
            "delegation": decision.delegation.id if decision.delegation else None,
            "delegating_user": decision.delegation.user if decision.delegation else None,
            "approval": approval.id if approval else None,
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
        peer, proc = resolve_caller(d, context, "workload")
        decision, approval = await self._gate.enforce(proc, peer, Request(kind="sign", agent=agent))
        key = self._gate.key(decision, d.agents.sign_key)
        signature = await d.signing.run(lambda: key.handle.sign(message, ES256))
        await d.audit.append({
            "event": "signature.issued", "agent": key.agent, "caller": proc.summary(),
            "request": {"context": request.context, "data_len": len(request.data),
                        "data_sha256": hashlib.sha256(request.data).hexdigest()},
            "decision": "allow", "rule": decision.rule, "bundle": decision.bundle,
            "kid": key.kid, "approval": approval.id if approval else None,
        })
        pem = self._public_pem(key)
        return workload_pb2.SignResponse(
            signature=signature, algorithm="ECDSA_P256_SHA256", key_id=key.kid,
            signed_message=message, public_key_pem=pem, agent=key.agent,
        )

    async def GetJwks(self, request: workload_pb2.GetJwksRequest,
                      context: Ctx) -> workload_pb2.GetJwksResponse:
        # Public keys are public: served to any caller, attested or not.
        return workload_pb2.GetJwksResponse(jwks_json=json.dumps(self._d.tokens.jwks()))

    async def WhoAmI(self, request: workload_pb2.WhoAmIRequest,
                     context: Ctx) -> workload_pb2.WhoAmIResponse:
        d = self._d
        _, proc = resolve_caller(d, context, "workload")
        selectors = proc.selectors()
        policy = d.policy.current
        now = d.clock()
        matches = []
        for rule in candidates(policy, selectors):
            if self._gate.agent_status(rule.agent) != "active":
                continue
            for bundle, why in bundles_in_effect(policy, rule, d.grants.grants(), now):
                matches.append(workload_pb2.AgentMatch(
                    agent=rule.agent, spiffe_id=d.agents.spiffe_id(rule.agent),
                    rule=f"{rule.source} via {why}", audiences=sorted(bundle.audiences),
                    scopes=sorted(bundle.scopes), max_ttl_seconds=bundle.max_ttl,
                    kinds=sorted(bundle.kinds)))
        misses = [
            workload_pb2.RuleMiss(
                agent=r.agent, rule=r.source,
                reason="missing selectors: " + ", ".join(missing_selectors(r, selectors)))
            for r in policy.agents if not r.matches(selectors)
        ]
        return workload_pb2.WhoAmIResponse(
            process=workload_pb2.ProcessInfo(
                pid=proc.pid, uid=proc.uid, gid=proc.gid, groups=list(proc.groups),
                exe=proc.exe or "", exe_sha256=proc.exe_sha256 or "", cgroup=proc.cgroup or "",
                selectors=sorted(selectors)),
            agents=matches, misses=misses)

    async def Delegate(self, request: workload_pb2.DelegateRequest,
                       context: Ctx) -> workload_pb2.Delegation:
        d = self._d
        agent = validate.agent_name(request.agent)
        if agent is None:
            raise InvalidRequestError("no agent", public="agent is required")
        audiences = frozenset(validate.audience(a) for a in request.audiences)
        scopes = frozenset(validate.scopes(list(request.scopes)))
        if not scopes:
            raise InvalidRequestError("no scopes", public="a delegation needs at least one scope")
        try:
            duration = parse_duration(request.ttl_seconds or 3600, what="ttl_seconds")
        except ValueError as exc:
            raise InvalidRequestError(str(exc), public=str(exc)) from None
        reason = validate.reason(request.reason)
        _, proc = resolve_caller(d, context, "workload")
        policy = d.policy.current
        if not may_delegate(policy, proc.selectors()):
            await d.audit.append({"event": "delegation.denied", "agent": agent,
                                  "caller": proc.summary(), "decision": "deny",
                                  "reason": "caller matches no [delegation] allow selector"})
            raise PolicyDeniedError(f"uid {proc.uid} may not delegate",
                                    public="denied by policy: this user may not delegate")
        if self._gate.agent_status(agent) != "active":
            raise PolicyDeniedError(f"delegation to {agent}: agent not active",
                                    public="denied by policy: agent does not exist")
        user = user_name(proc.uid)
        grant = d.grants.add_delegation(user=user, uid=proc.uid, agent=agent, audiences=audiences,
                                        scopes=scopes, duration=duration, reason=reason)
        await d.audit.append({"event": "delegation.created", "agent": agent, "user": user,
                              "caller": proc.summary(), "decision": "allow",
                              "delegation": grant.id, "scopes": sorted(scopes),
                              "audiences": sorted(audiences), "expires_at": int(grant.expires_at),
                              "rule": policy.delegators_source})
        return delegation_to_pb(grant)


def delegation_to_pb(g: Any) -> workload_pb2.Delegation:
    return workload_pb2.Delegation(
        id=g.id, user=g.user, uid=g.uid, agent=g.agent, audiences=sorted(g.audiences),
        scopes=sorted(g.scopes), created_at=int(g.created_at), expires_at=int(g.expires_at),
        revoked=g.revoked, reason=g.reason)


def _request_summary(req: Request) -> dict[str, Any]:
    return {"kind": req.kind, "agent": req.agent, "audience": req.audience,
            "scopes": list(req.scopes), "ttl": req.ttl, "delegation": req.delegation}


def _public_reason(decision: Decision) -> str:
    """A caller-safe phrase: what was wrong with *its own* request, no rule text."""
    reason = decision.reason
    for needle, phrase in (
        ("agent is revoked", "agent is revoked"),
        ("agent is missing", "agent does not exist"),
        ("several agents", "caller may act as several agents; name one with agent="),
        ("delegation", "no such active delegation for this agent, or outside it"),
        ("audience", "audience not allowed for this agent"),
        ("scopes", "scope not allowed for this agent"),
        ("ttl", "ttl above this agent's cap"),
        ("kind", "operation not allowed for this agent"),
    ):
        if needle in reason:
            return f"denied by policy: {phrase}"
    return "denied by policy: no identity for this caller"
