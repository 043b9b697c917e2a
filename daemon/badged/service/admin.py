"""Admin service: agent lifecycle, for operators on the admin socket only."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from badged.attest.process import ProcessAttributes
from badged.core import context as request_context
from badged.enroll.assurance import AssuranceOracle
from badged.enroll.store import EnrollmentStore
from badged.errors import (
    AttestationError,
    BadgedError,
    FailedPreconditionError,
    InvalidRequestError,
    NotFoundError,
)
from badged.identity.registry import check_agent_name
from badged.listener.peers import PeerCredentials, exe_identity, proc_start_time
from badged.policy.loader import parse_duration
from badged.policy.model import KINDS, Grant, Request, evaluate
from badged.service import validate
from badged.service.approvals import PendingApproval
from badged.service.auth import require_operator, resolve_caller
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx
from badged.service.marshal import agent_to_pb
from badged.service.workload import PolicyGate, delegation_to_pb, user_name
from badged.sshagent.ca import DEFAULT_VALIDITY_S, issue_for_agent
from badged_proto.v1 import admin_pb2, admin_pb2_grpc, workload_pb2


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps
        self._gate = PolicyGate(deps)
        self._assurance = AssuranceOracle(EnrollmentStore(deps.state_dir), deps.keystore)

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
        # The registry audits intent and completion itself, before the change takes effect.
        # Key generation is a hardware call: where signatures run, off the loop
        # on a TPM (a hung TPM then costs this call UNAVAILABLE, not the loop).
        name = check_agent_name(request.name)
        rec = await self._d.signing.run(lambda: self._d.agents.create(
            name, request.description, caller=proc.summary()))
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
        out = agent_to_pb(self._d.agents.get(check_agent_name(request.name)), self._now())
        if out.status == "active":
            if self._assurance.hardware_pending():
                # facts() may read the TPM's AK (once): off the loop, not behind signatures.
                await asyncio.to_thread(self._assurance.facts)
            out.assurance = self._assurance.level(out.name, self._d.clock())
        return out

    async def IssueSshCertificate(self, request: admin_pb2.IssueSshCertificateRequest,
                                  context: Ctx) -> admin_pb2.SshCertificate:
        proc = self._operator(context)
        ca = self._d.ssh_ca
        if ca is None:
            raise FailedPreconditionError("no SSH CA configured ([ssh] ca_key)",
                                          public="no SSH CA configured ([ssh] ca_key)")
        cert = await issue_for_agent(self._d, ca, check_agent_name(request.agent),
                                     request.validity_seconds or DEFAULT_VALIDITY_S,
                                     proc.summary())
        return admin_pb2.SshCertificate(
            certificate=cert.line, serial=cert.serial, principals=list(cert.principals),
            valid_after=cert.valid_after, valid_before=cert.valid_before,
            ca_public_key=ca.public_line)

    async def RotateAgent(self, request: admin_pb2.RotateAgentRequest,
                          context: Ctx) -> admin_pb2.Agent:
        proc = self._operator(context)
        name = check_agent_name(request.name)
        rec = await self._d.signing.run(lambda: self._d.agents.rotate(name, caller=proc.summary()))
        return agent_to_pb(rec, self._now())

    async def RevokeAgent(self, request: admin_pb2.RevokeAgentRequest,
                          context: Ctx) -> admin_pb2.Agent:
        proc = self._operator(context)
        name = check_agent_name(request.name)
        rec = await self._d.signing.run(lambda: self._d.agents.revoke(
            name, request.reason, caller=proc.summary()))
        await self._mark("agent", proc, name)
        return agent_to_pb(rec, self._now())

    async def _mark(self, what: str, proc: ProcessAttributes, agent: str, *,
                    grant: str | None = None, delegation: str | None = None) -> None:
        """Revocation reaches relying parties: set the status-list bits of the
        live tokens it covers (issue 21), and say how many on record."""
        status = self._d.status
        if status is None:
            return
        marked = status.revoke(agent=agent if what == "agent" else None, grant=grant,
                               delegation=delegation)
        await self._audit("status.marked", proc, agent, revoked=what, marked=marked,
                          grant=grant, delegation=delegation)

    # -- step-ups ---------------------------------------------------------------

    async def GrantBundle(self, request: admin_pb2.GrantBundleRequest,
                          context: Ctx) -> admin_pb2.Grant:
        proc = self._operator(context)
        agent = check_agent_name(request.agent)
        policy = self._d.policy.current
        if request.bundle not in policy.bundles or request.bundle.startswith("bind."):
            raise NotFoundError(f"bundle {request.bundle!r} not in policy",
                                public="no such bundle in the policy")
        self._d.agents.active(agent)
        try:
            duration = parse_duration(request.duration_seconds, what="duration")
        except ValueError as exc:
            raise InvalidRequestError(str(exc), public=str(exc)) from None
        reason = validate.reason(request.reason)
        if not reason:
            raise InvalidRequestError("no reason", public="a step-up needs a --reason")
        scope = request_context.parse(request.context) if request.context else ()
        by = user_name(proc.uid)
        grant = self._d.grants.add_grant(agent=agent, bundle=request.bundle, duration=duration,
                                         reason=reason, granted_by=by, context=scope)
        await self._audit("grant.created", proc, agent, grant=grant.id, bundle=grant.bundle,
                          expires_at=int(grant.expires_at), reason=reason,
                          context=dict(scope) or None)
        return self._grant_pb(grant)

    async def RevokeGrant(self, request: admin_pb2.RevokeGrantRequest,
                          context: Ctx) -> admin_pb2.Grant:
        proc = self._operator(context)
        grant = self._d.grants.revoke_grant(request.id)
        await self._audit("grant.revoked", proc, grant.agent, grant=grant.id)
        await self._mark("grant", proc, grant.agent, grant=grant.id)
        for item in self._d.approvals.cancel_for_grant(grant.id, by=user_name(proc.uid)):
            await self._audit("approval.cancelled", proc, item.agent, approval=item.id,
                              reason=item.comment, decision="deny")
        return self._grant_pb(grant)

    async def ListGrants(self, request: admin_pb2.ListGrantsRequest,
                         context: Ctx) -> admin_pb2.ListGrantsResponse:
        self._operator(context)
        grants = [self._grant_pb(g) for g in self._d.grants.grants()]
        if not request.include_inactive:
            grants = [g for g in grants if g.state == "active"]
        return admin_pb2.ListGrantsResponse(grants=grants)

    def _grant_pb(self, g: Grant) -> admin_pb2.Grant:
        now = self._d.clock()
        state = "revoked" if g.revoked else ("active" if g.active(now) else "expired")
        return admin_pb2.Grant(id=g.id, agent=g.agent, bundle=g.bundle,
                               created_at=int(g.created_at), expires_at=int(g.expires_at),
                               reason=g.reason, granted_by=g.granted_by, state=state,
                               context=dict(g.context))

    # -- approvals --------------------------------------------------------------

    async def ListApprovals(self, request: admin_pb2.ListApprovalsRequest,
                            context: Ctx) -> admin_pb2.ListApprovalsResponse:
        self._operator(context)
        return admin_pb2.ListApprovalsResponse(
            approvals=[_approval_pb(a) for a in self._d.approvals.list()])

    async def DecideApproval(self, request: admin_pb2.DecideApprovalRequest,
                             context: Ctx) -> admin_pb2.Approval:
        proc = self._operator(context)
        item = self._d.approvals.decide(
            request.id, approve=request.approve, by=user_name(proc.uid), by_uid=proc.uid,
            comment=request.comment,
            requester_may_approve=self._d.policy.current.requester_may_approve,
            recheck=self._still_allowed)
        await self._audit("approval.decided", proc, item.agent, approval=item.id,
                          outcome=item.state, comment=item.comment)
        if request.approve and item.state == "cancelled":
            raise FailedPreconditionError(
                f"approval {item.id}: {item.comment}",
                public="the policy no longer allows this request; the approval was cancelled")
        return _approval_pb(item)

    def _still_allowed(self, item: PendingApproval) -> str | None:
        """The policy as it is now, for the request as it was made (budget aside:
        the request already spent it when it asked)."""
        d = self._d
        decision = evaluate(d.policy.current, item.process.selectors(), item.request,
                            now=d.clock(), default_ttl=d.default_ttl, max_ttl=d.max_ttl,
                            grants=d.grants.grants(), delegations=d.grants.delegations())
        if not decision.allowed:
            return decision.reason
        if decision.agent != item.agent:
            return f"the caller is now {decision.agent}"
        status = self._gate.agent_status(item.agent)
        return None if status == "active" else f"agent is {status}"

    # -- delegations ----------------------------------------------------------

    async def ListDelegations(self, request: admin_pb2.ListDelegationsRequest,
                              context: Ctx) -> admin_pb2.ListDelegationsResponse:
        self._operator(context)
        now = self._d.clock()
        items = sorted(self._d.grants.delegations().values(), key=lambda x: x.created_at)
        if not request.include_inactive:
            items = [x for x in items if x.active(now)]
        return admin_pb2.ListDelegationsResponse(delegations=[delegation_to_pb(x) for x in items])

    async def RevokeDelegation(self, request: admin_pb2.RevokeDelegationRequest,
                               context: Ctx) -> workload_pb2.Delegation:
        proc = self._operator(context)
        item = self._d.grants.revoke_delegation(request.id)
        await self._audit("delegation.revoked", proc, item.agent, delegation=item.id)
        await self._mark("delegation", proc, item.agent, delegation=item.id)
        return delegation_to_pb(item)

    # -- policy -------------------------------------------------------------------

    async def ExplainPolicy(self, request: admin_pb2.ExplainPolicyRequest,
                            context: Ctx) -> admin_pb2.ExplainPolicyResponse:
        self._operator(context)
        kind = request.kind or "token"
        if kind not in KINDS:
            raise InvalidRequestError("bad kind", public=f"kind must be one of {', '.join(KINDS)}")
        target = _attest_pid(self._d, request.pid)
        req = Request(kind=kind, agent=validate.agent_name(request.agent),
                      audience=request.audience, scopes=validate.scopes(list(request.scopes)),
                      ttl=validate.ttl(request.ttl_seconds),
                      delegation=validate.opaque_id(request.delegation, "delegation"),
                      context=request_context.parse(request.context) if request.context else ())
        decision = self._gate.decide(target, req, consume=False)
        return admin_pb2.ExplainPolicyResponse(
            allowed=decision.allowed, agent=decision.agent or "", rule=decision.rule,
            bundle=decision.bundle or "", reason=decision.reason, trace=list(decision.trace),
            selectors=sorted(target.selectors()), approval_required=decision.approval_required,
            ttl_seconds=decision.ttl)

    async def ReloadPolicy(self, request: admin_pb2.ReloadPolicyRequest,
                           context: Ctx) -> admin_pb2.ReloadPolicyResponse:
        proc = self._operator(context)
        error = self._d.policy.try_reload()
        policy = self._d.policy.current
        await self._audit("policy.reloaded" if error is None else "policy.rejected", proc, "",
                          policy=str(self._d.policy.path), error=str(error) if error else None)
        return admin_pb2.ReloadPolicyResponse(
            ok=error is None, error=str(error) if error else "", agents=len(policy.agents),
            bundles=len(policy.bundles))


def _attest_pid(deps: ServiceDeps, pid: int) -> ProcessAttributes:
    """Attest an arbitrary live process for `explain` (operators only)."""
    if pid <= 0:
        raise InvalidRequestError("bad pid", public="pid is required")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotFoundError(f"pid {pid} not found", public="no such process") from None
    try:
        uid, gid = _effective_ids(pid)
        peer = PeerCredentials(pid=pid, uid=uid, gid=gid, pidfd=pidfd,
                               start_time=proc_start_time(pid), channel="workload",
                               exe=exe_identity(pid))
        return deps.attestor.attest(peer)
    except (OSError, AttestationError, BadgedError) as exc:
        raise NotFoundError(f"cannot attest pid {pid}: {exc}", public="cannot attest that process") from None
    finally:
        os.close(pidfd)


def _effective_ids(pid: int) -> tuple[int, int]:
    """Effective uid/gid from /proc/<pid>/status (what SO_PEERCRED would report)."""
    ids: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("Uid:", "Gid:")):
                ids[line[:3]] = int(line.split()[2])
    return ids["Uid"], ids["Gid"]


def _approval_pb(a: PendingApproval) -> admin_pb2.Approval:
    p = a.process
    return admin_pb2.Approval(
        id=a.id, agent=a.agent, bundle=a.bundle, kind=a.request.kind, audience=a.request.audience,
        scopes=list(a.request.scopes), ttl_seconds=a.request.ttl, reason=a.reason, pid=p.pid,
        uid=p.uid, exe=p.exe or "", exe_sha256=p.exe_sha256 or "", process_chain=list(p.chain),
        requested_at=int(a.requested_at), deadline=int(a.deadline), state=a.state,
        decided_by=a.decided_by, context=dict(a.request.context), txn=a.txn,
        detail=_approval_detail(a.request))


def _approval_detail(req: Request) -> str:
    """What the operator approves beyond agent and process: for SSH, the destination or namespace."""
    if req.kind != "ssh":
        return ""
    if req.ssh_purpose == "auth":
        return f"ssh auth user={req.ssh_user or '?'} host={req.ssh_host or 'unknown (no session-bind)'}"
    if req.ssh_purpose == "sshsig":
        return f"ssh sshsig namespace={req.ssh_namespace}"
    return "ssh unclassified data"
