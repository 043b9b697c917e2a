"""Workload service: marshalling over the one issuance pipeline.

FetchToken and Sign are credential kinds of :mod:`badged.service.issuance`,
which owns the order (attested caller, policy, the caller's own key, signing,
durable audit, answer); the handlers here validate the request, say what to
mint and turn the result into protobuf. WhoAmI and Delegate are not
issuances: they read or change policy state for the caller itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import pwd
from typing import Any

from cryptography.hazmat.primitives import serialization

from badged.attest.process import ProcessAttributes
from badged.core import context as request_context
from badged.core.jose import ec_public_jwk
from badged.core.signing import signed_message
from badged.core.tokens import ES256, JWKS_ISSUER_MEMBER, IssuedToken, build_claims, mint_token
from badged.enroll.assurance import CLAIM as ASSURANCE_CLAIM
from badged.enroll.assurance import AssuranceOracle
from badged.enroll.store import EnrollmentStore
from badged.errors import (
    FailedPreconditionError,
    InvalidRequestError,
    NotFoundError,
    PolicyDeniedError,
)
from badged.identity.registry import SigningKey
from badged.policy.loader import parse_duration
from badged.policy.model import (
    Request,
    bundles_in_effect,
    candidates,
    delegation_refusal,
    missing_selectors,
)
from badged.service import validate
from badged.service.auth import require_operator, resolve_caller
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx
from badged.service.issuance import Authorized, Issuance, Minted, PolicyGate
from badged_proto.v1 import workload_pb2, workload_pb2_grpc

__all__ = ["PolicyGate", "WorkloadServicer", "delegation_to_pb", "user_name"]

_logger = logging.getLogger(__name__)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid-{uid}"


class WorkloadServicer(workload_pb2_grpc.WorkloadServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps
        self._issue = Issuance(deps)
        self._gate = self._issue.gate
        self._pems: dict[str, str] = {}
        self._assurance = AssuranceOracle(EnrollmentStore(deps.state_dir), deps.keystore)

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
        dpop_bound = request.dpop_bound
        # Asserted by the agent (docs/credentials.md "Request context"):
        # bounded and typed here, before anything else looks at it.
        req_ctx = request_context.parse(request.context) if request.context else ()
        traceparent = request_context.traceparent(request.traceparent)
        caller = self._issue.caller(context)
        req = Request(kind="token", agent=agent, audience=audience, scopes=scopes, ttl=ttl,
                      delegation=delegation_id, context=req_ctx)

        def mint(auth: Authorized) -> Minted[IssuedToken]:
            decision, approval, key = auth.decision, auth.approval, auth.key
            extra: dict[str, Any] = {}
            subject = key.spiffe_id
            if decision.delegation is not None:
                # RFC 8693: the token is about the user, acted on by the agent.
                subject = f"spiffe://{d.trust_domain}/user/{decision.delegation.user}"
                extra["act"] = {"sub": key.spiffe_id}
            if dpop_bound:
                # Proofs are signed by the hardware token key (also in session
                # mode), so the binding names that key's RFC 7638 thumbprint.
                extra["cnf"] = {"jkt": d.agents.token_key(key.agent).kid}
            if approval is not None:
                extra["approval"] = {"id": approval.id, "by": approval.decided_by,
                                     "at": int(approval.decided_at)}
            extra[ASSURANCE_CLAIM] = self._assurance.level(key.agent, d.clock())
            extra["txn"] = auth.txn
            if req_ctx:
                extra["ctx"] = request_context.claim(req_ctx)
            now = d.clock()
            status = d.status
            idx = None
            if status is not None:  # revocation reaches relying parties (badged.statuslist)
                idx = status.allocate(
                    exp=now + decision.ttl, agent=key.agent, grant=decision.grant,
                    delegation=decision.delegation.id if decision.delegation else None)
                extra["status"] = status.claim(idx)
            claims = build_claims(issuer=d.issuer, subject=subject, audience=audience,
                                  scopes=scopes, ttl_seconds=decision.ttl, now=now,
                                  jti=d.new_jti(), extra=extra)
            issued = mint_token(claims=claims, key=key.handle, key_id=key.kid)
            return Minted(issued, key.spiffe_id, {
                "request": {"audience": audience, "scopes": list(scopes), "ttl": decision.ttl},
                "jti": issued.jti, "exp": issued.expires_at,
                "credential_sha256": hashlib.sha256(issued.token.encode()).hexdigest(),
                "delegation": decision.delegation.id if decision.delegation else None,
                "delegating_user": decision.delegation.user if decision.delegation else None,
                "status_idx": idx,
            })

        auth, issued = await self._issue.issue(caller, req, "token.issued", d.tokens.token_key,
                                               mint, reason=reason, traceparent=traceparent)
        key = auth.key
        return workload_pb2.FetchTokenResponse(
            token=issued.token, agent=key.agent, spiffe_id=key.spiffe_id,
            issued_at=issued.issued_at, expires_at=issued.expires_at, jti=issued.jti,
            key_id=issued.key_id, txn=auth.txn,
        )

    async def Sign(self, request: workload_pb2.SignRequest,
                   context: Ctx) -> workload_pb2.SignResponse:
        data = request.data
        message = signed_message(request.context, data)
        agent = validate.agent_name(request.agent)
        caller = self._issue.caller(context)
        sign_context = request.context

        def mint(auth: Authorized) -> Minted[bytes]:
            key = auth.key
            return Minted(key.handle.sign(message, ES256), key.spiffe_id, {
                "request": {"context": sign_context, "data_len": len(data),
                            "data_sha256": hashlib.sha256(data).hexdigest()}})

        auth, signature = await self._issue.issue(
            caller, Request(kind="sign", agent=agent), "signature.issued", self._d.agents.sign_key,
            mint)
        key = auth.key
        pem = self._public_pem(key)
        return workload_pb2.SignResponse(
            signature=signature, algorithm="ECDSA_P256_SHA256", key_id=key.kid,
            signed_message=message, public_key_pem=pem, agent=key.agent,
        )

    async def GetJwks(self, request: workload_pb2.GetJwksRequest,
                      context: Ctx) -> workload_pb2.GetJwksResponse:
        # Public keys are public: served to any caller, attested or not. The
        # issuer rides along so a verifier built from this document requires it
        # (RFC 7517 §5: members a JWK Set reader does not know are ignored).
        doc = {**self._d.tokens.jwks(), JWKS_ISSUER_MEMBER: self._d.issuer}
        return workload_pb2.GetJwksResponse(jwks_json=json.dumps(doc))

    async def WhoAmI(self, request: workload_pb2.WhoAmIRequest,
                     context: Ctx) -> workload_pb2.WhoAmIResponse:
        """The caller's own process and the agents *it* may act as.

        Only an operator also learns about the other agents' rules and which
        selectors it lacks for them: for anyone else that list is a map of
        what to forge (issue 13), so a non-operator gets no misses at all (an
        operator can ask ``badgectl policy explain --pid``).
        """
        d = self._d
        _, proc = resolve_caller(d, context, "workload")
        selectors = proc.selectors()
        policy = d.policy.current
        now = d.clock()
        if self._assurance.hardware_pending():
            # facts() may read the TPM's AK (once per daemon): off the loop, and
            # not on the signing thread, where it would wait behind a ~200 ms
            # TPM signature (the key store serializes device access itself).
            await asyncio.to_thread(self._assurance.facts)
        matches = []
        for rule in candidates(policy, selectors):
            if self._gate.agent_status(rule.agent) != "active":
                continue
            for bundle, why in bundles_in_effect(policy, rule, d.grants.grants(), now):
                matches.append(workload_pb2.AgentMatch(
                    agent=rule.agent, spiffe_id=d.agents.spiffe_id(rule.agent),
                    rule=f"{rule.source} via {why}", audiences=sorted(bundle.audiences),
                    scopes=sorted(bundle.scopes), max_ttl_seconds=bundle.max_ttl,
                    kinds=sorted(bundle.kinds),
                    assurance=self._assurance.level(rule.agent, now)))
        misses = []
        if self._is_operator(proc):
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

    def _is_operator(self, proc: ProcessAttributes) -> bool:
        try:
            require_operator(self._d, proc)
        except PolicyDeniedError:
            return False
        return True

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
        refusal = delegation_refusal(policy, proc.selectors())
        if refusal is not None:  # not a listed delegator, or itself an agent
            await d.audit.append({"event": "delegation.denied", "agent": agent,
                                  "caller": proc.summary(), "decision": "deny",
                                  "reason": refusal})
            raise PolicyDeniedError(f"uid {proc.uid} may not delegate: {refusal}",
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


    # -- people manage what they delegated (issue 21) ---------------------------------

    async def _as_person(self, context: Ctx, what: str) -> ProcessAttributes:
        """The attested caller, refused if it is an agent process.

        Only the kernel's word counts: the uid from SO_PEERCRED and the
        selectors attestation read. A process that matches any agent rule is
        an agent, not the person (the same line as for creating a delegation,
        :func:`~badged.policy.model.delegation_refusal`), unless the policy
        says this is a single-user box (``agents_may_delegate``).
        """
        d = self._d
        _, proc = resolve_caller(d, context, "workload")
        policy = d.policy.current
        if not policy.agents_may_delegate:
            agents = sorted({r.agent for r in policy.matching(proc.selectors())})
            if agents:
                await d.audit.append({"event": "delegation.denied", "agent": agents[0],
                                      "caller": proc.summary(), "decision": "deny",
                                      "reason": f"{what} by an agent process "
                                                f"({', '.join(agents)})"})
                raise PolicyDeniedError(
                    f"uid {proc.uid} pid {proc.pid} is agent {', '.join(agents)}: may not {what}",
                    public="denied by policy: an agent process may not manage delegations")
        return proc

    async def ListMyDelegations(self, request: workload_pb2.ListMyDelegationsRequest,
                                context: Ctx) -> workload_pb2.ListMyDelegationsResponse:
        """The caller's own delegations: matched on the attested uid, nothing else."""
        proc = await self._as_person(context, "list delegations")
        now = self._d.clock()
        items = sorted((x for x in self._d.grants.delegations().values() if x.uid == proc.uid),
                       key=lambda x: x.created_at)
        if not request.include_inactive:
            items = [x for x in items if x.active(now)]
        return workload_pb2.ListMyDelegationsResponse(
            delegations=[delegation_to_pb(x) for x in items])

    async def RevokeMyDelegation(self, request: workload_pb2.RevokeMyDelegationRequest,
                                 context: Ctx) -> workload_pb2.Delegation:
        """End one of the caller's own delegations, and mark its live tokens revoked.

        Someone else's delegation answers exactly like an unknown id: the
        caller learns nothing about delegations it did not make.
        """
        d = self._d
        delegation_id = validate.opaque_id(request.id, "delegation")
        proc = await self._as_person(context, "revoke a delegation")
        item = d.grants.delegations().get(delegation_id or "")
        if item is None or item.uid != proc.uid:
            await d.audit.append({"event": "delegation.revoke_denied", "agent": None,
                                  "caller": proc.summary(), "decision": "deny",
                                  "delegation": delegation_id,
                                  "reason": "not the caller's delegation"})
            raise NotFoundError("delegation not found")
        item = d.grants.revoke_delegation(item.id)
        marked = d.status.revoke(delegation=item.id) if d.status is not None else 0
        await d.audit.append({"event": "delegation.revoked", "agent": item.agent,
                              "user": item.user, "caller": proc.summary(), "decision": "allow",
                              "delegation": item.id, "by": "delegating user",
                              "status_marked": marked})
        return delegation_to_pb(item)

    async def GetStatusList(self, request: workload_pb2.GetStatusListRequest,
                            context: Ctx) -> workload_pb2.GetStatusListResponse:
        """Public, like the JWKS: the signed Token Status List (badged.statuslist)."""
        d = self._d
        status = d.status
        if status is None:
            raise FailedPreconditionError("no status list", public="status list not enabled")
        jwt = await d.signing.run(lambda: status.token(d.device_key))
        return workload_pb2.GetStatusListResponse(
            status_list_jwt=jwt, uri=status.uri,
            device_jwk_json=json.dumps(ec_public_jwk(d.device_key.public_key())))


def delegation_to_pb(g: Any) -> workload_pb2.Delegation:
    return workload_pb2.Delegation(
        id=g.id, user=g.user, uid=g.uid, agent=g.agent, audiences=sorted(g.audiences),
        scopes=sorted(g.scopes), created_at=int(g.created_at), expires_at=int(g.expires_at),
        revoked=g.revoked, reason=g.reason)
