"""Python client for badged's workload and admin sockets.

Example::

    from badgeclient import WorkloadClient

    with WorkloadClient() as client:            # $BADGED_SOCKET or /run/badged/agent.sock
        tok = client.fetch_token(audience="https://api.example.com", scopes=["read"])
        headers = {"Authorization": f"Bearer {tok.token}"}

The client never sends who it is: the daemon reads that from the kernel.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from badgeclient.errors import InvalidRequestError, UnavailableError, from_rpc_error
from badged_proto.v1 import admin_pb2, admin_pb2_grpc, workload_pb2, workload_pb2_grpc

DEFAULT_SOCKET = "/run/badged/agent.sock"
DEFAULT_ADMIN_SOCKET = "/run/badged/admin.sock"
T = TypeVar("T")


def _socket_target(path: str | os.PathLike[str]) -> str:
    """Validate early, like py-spiffe: a bad path is a usage error, not a hang."""
    text = os.fspath(path)
    if text.startswith("unix:"):
        text = text[len("unix:"):]
    if not text.startswith("/"):
        raise InvalidRequestError(f"socket path must be absolute: {text!r}")
    if len(text.encode()) >= 108:
        raise InvalidRequestError("socket path too long for a Unix socket")
    return f"unix:{text}"


@dataclass(frozen=True)
class Token:
    token: str
    agent: str
    spiffe_id: str
    issued_at: int
    expires_at: int
    jti: str
    key_id: str
    txn: str = ""  # transaction id: the token's "txn" claim (badgectl audit trace)

    def __repr__(self) -> str:  # never print the bearer token by accident
        return (f"Token(agent={self.agent!r}, jti={self.jti!r}, expires_at={self.expires_at}, "
                f"token=<{len(self.token)} chars>)")


@dataclass(frozen=True)
class Signature:
    signature: bytes
    algorithm: str
    key_id: str
    signed_message: bytes
    public_key_pem: str
    agent: str


@dataclass(frozen=True)
class AgentMatch:
    agent: str
    spiffe_id: str
    rule: str
    audiences: list[str]
    scopes: list[str]
    max_ttl_seconds: int
    kinds: list[str]
    assurance: str = ""


@dataclass(frozen=True)
class WhoAmI:
    pid: int
    uid: int
    gid: int
    exe: str
    exe_sha256: str
    selectors: list[str]
    agents: list[AgentMatch]
    misses: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class KeyVersionInfo:
    version: int
    token_kid: str
    sign_kid: str
    state: str
    created_at: int
    retired_at: int
    publish_until: int
    ssh_public_key: str = ""  # OpenSSH line; "" when the version has no SSH key


@dataclass(frozen=True)
class AgentInfo:
    name: str
    spiffe_id: str
    status: str
    current_version: int
    keys: list[KeyVersionInfo]
    created_at: int
    revoked_at: int
    revoke_reason: str
    description: str
    assurance: str = ""


@dataclass(frozen=True)
class DelegationInfo:
    id: str
    user: str
    uid: int
    agent: str
    audiences: list[str]
    scopes: list[str]
    created_at: int
    expires_at: int
    revoked: bool
    reason: str


@dataclass(frozen=True)
class GrantInfo:
    id: str
    agent: str
    bundle: str
    created_at: int
    expires_at: int
    reason: str
    granted_by: str
    state: str
    context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ApprovalInfo:
    id: str
    agent: str
    bundle: str
    kind: str
    audience: str
    scopes: list[str]
    ttl_seconds: int
    reason: str
    pid: int
    uid: int
    exe: str
    exe_sha256: str
    process_chain: list[str]
    requested_at: int
    deadline: int
    state: str
    decided_by: str
    context: dict[str, str] = field(default_factory=dict)  # asserted by the agent
    txn: str = ""
    detail: str = ""  # e.g. the SSH destination or namespace, as the daemon classified it


@dataclass(frozen=True)
class SshCertificateInfo:
    certificate: str  # the -cert.pub line
    serial: int
    principals: list[str]
    valid_after: int
    valid_before: int
    ca_public_key: str


@dataclass(frozen=True)
class Explanation:
    allowed: bool
    agent: str
    rule: str
    bundle: str
    reason: str
    trace: list[str]
    selectors: list[str]
    approval_required: bool
    ttl_seconds: int


def _delegation(pb: workload_pb2.Delegation) -> DelegationInfo:
    return DelegationInfo(pb.id, pb.user, pb.uid, pb.agent, list(pb.audiences), list(pb.scopes),
                          pb.created_at, pb.expires_at, pb.revoked, pb.reason)


def _grant(pb: admin_pb2.Grant) -> GrantInfo:
    return GrantInfo(pb.id, pb.agent, pb.bundle, pb.created_at, pb.expires_at, pb.reason,
                     pb.granted_by, pb.state, dict(pb.context))


def _approval(pb: admin_pb2.Approval) -> ApprovalInfo:
    return ApprovalInfo(pb.id, pb.agent, pb.bundle, pb.kind, pb.audience, list(pb.scopes),
                        pb.ttl_seconds, pb.reason, pb.pid, pb.uid, pb.exe, pb.exe_sha256,
                        list(pb.process_chain), pb.requested_at, pb.deadline, pb.state,
                        pb.decided_by, dict(pb.context), pb.txn, pb.detail)


def _agent(pb: admin_pb2.Agent) -> AgentInfo:
    return AgentInfo(
        name=pb.name, spiffe_id=pb.spiffe_id, status=pb.status,
        current_version=pb.current_version,
        keys=[KeyVersionInfo(k.version, k.token_kid, k.sign_kid, k.state, k.created_at,
                             k.retired_at, k.publish_until, k.ssh_public_key)
              for k in pb.keys],
        created_at=pb.created_at, revoked_at=pb.revoked_at, revoke_reason=pb.revoke_reason,
        description=pb.description, assurance=pb.assurance)


class _Base:
    def __init__(self, socket_path: str | os.PathLike[str], timeout: float) -> None:
        self.socket_path = Path(_socket_target(socket_path)[len("unix:"):])
        self._timeout = timeout
        self._channel = grpc.insecure_channel(_socket_target(socket_path))

    def _call(self, fn: Callable[..., T], request: Any) -> T:
        try:
            return fn(request, timeout=self._timeout)
        except grpc.RpcError as err:
            # Only a failed call looks at the socket file, for a clearer reason:
            # a stat per call costs the common path (issue 18's client profile).
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                try:
                    self.socket_path.stat()
                except FileNotFoundError:
                    raise UnavailableError(
                        f"no badged socket at {self.socket_path} (is the daemon running?)",
                        status="UNAVAILABLE") from None
                except PermissionError:
                    raise UnavailableError(f"permission denied reaching {self.socket_path}",
                                           status="UNAVAILABLE") from None
            raise from_rpc_error(err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class WorkloadClient(_Base):
    """For agent processes: tokens, signatures, the JWKS, and ``whoami``."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 timeout: float = 30.0) -> None:
        super().__init__(socket_path or os.environ.get("BADGED_SOCKET") or DEFAULT_SOCKET, timeout)
        self._stub = workload_pb2_grpc.WorkloadServiceStub(self._channel)

    def fetch_token(self, *, audience: str, scopes: Sequence[str] = (), ttl_seconds: int = 0,
                    agent: str | None = None, delegation: str | None = None,
                    reason: str = "", dpop_bound: bool = False,
                    context: Mapping[str, str] | None = None, traceparent: str = "") -> Token:
        """A short-lived JWT. With ``delegation``, sub = the user and act.sub = the agent.

        ``context``: what the agent is working on (channel, task, session,
        on_behalf_of), asserted, never attested; ``traceparent``: the caller's
        W3C trace context, recorded in the audit beside the token's ``txn``.

        If the policy requires approval this call blocks until an operator
        decides (or the daemon's approval timeout denies it).
        """
        r = self._call(self._stub.FetchToken, workload_pb2.FetchTokenRequest(
            agent=agent or "", audience=audience, scopes=list(scopes), ttl_seconds=ttl_seconds,
            delegation=delegation or "", reason=reason, dpop_bound=dpop_bound,
            context=dict(context or {}), traceparent=traceparent))
        return Token(r.token, r.agent, r.spiffe_id, r.issued_at, r.expires_at, r.jti, r.key_id,
                     r.txn)

    def sign(self, data: bytes, *, context: str = "", agent: str | None = None) -> Signature:
        r = self._call(self._stub.Sign, workload_pb2.SignRequest(
            agent=agent or "", data=data, context=context))
        return Signature(r.signature, r.algorithm, r.key_id, r.signed_message, r.public_key_pem,
                         r.agent)

    def jwks(self) -> dict[str, Any]:
        r = self._call(self._stub.GetJwks, workload_pb2.GetJwksRequest())
        doc: dict[str, Any] = json.loads(r.jwks_json)
        return doc

    def delegate(self, *, agent: str, scopes: Sequence[str], audiences: Sequence[str] = (),
                 ttl_seconds: int = 3600, reason: str = "") -> DelegationInfo:
        """As a human user: let ``agent`` act for you, within ``scopes``, for a while."""
        r = self._call(self._stub.Delegate, workload_pb2.DelegateRequest(
            agent=agent, scopes=list(scopes), audiences=list(audiences), ttl_seconds=ttl_seconds,
            reason=reason))
        return _delegation(r)

    def my_delegations(self, include_inactive: bool = False) -> list[DelegationInfo]:
        """As a human user: the delegations *you* made (attested uid), nobody else's."""
        r = self._call(self._stub.ListMyDelegations,
                       workload_pb2.ListMyDelegationsRequest(include_inactive=include_inactive))
        return [_delegation(d) for d in r.delegations]

    def revoke_my_delegation(self, delegation_id: str) -> DelegationInfo:
        """As a human user: end one of your own delegations (others' are "not found")."""
        return _delegation(self._call(self._stub.RevokeMyDelegation,
                                      workload_pb2.RevokeMyDelegationRequest(id=delegation_id)))

    def status_list(self) -> tuple[str, str]:
        """The daemon's signed Token Status List: (status list JWT, its uri)."""
        r = self._call(self._stub.GetStatusList, workload_pb2.GetStatusListRequest())
        return r.status_list_jwt, r.uri

    def whoami(self) -> WhoAmI:
        r = self._call(self._stub.WhoAmI, workload_pb2.WhoAmIRequest())
        p = r.process
        return WhoAmI(
            pid=p.pid, uid=p.uid, gid=p.gid, exe=p.exe, exe_sha256=p.exe_sha256,
            selectors=list(p.selectors),
            agents=[AgentMatch(a.agent, a.spiffe_id, a.rule, list(a.audiences), list(a.scopes),
                               a.max_ttl_seconds, list(a.kinds), a.assurance) for a in r.agents],
            misses=[{"agent": m.agent, "rule": m.rule, "reason": m.reason} for m in r.misses])


class AdminClient(_Base):
    """For operators: agent lifecycle over the admin socket."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 timeout: float = 30.0) -> None:
        super().__init__(socket_path or os.environ.get("BADGED_ADMIN_SOCKET")
                         or DEFAULT_ADMIN_SOCKET, timeout)
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def create_agent(self, name: str, description: str = "") -> AgentInfo:
        return _agent(self._call(self._stub.CreateAgent,
                                 admin_pb2.CreateAgentRequest(name=name, description=description)))

    def list_agents(self, include_revoked: bool = False) -> list[AgentInfo]:
        r = self._call(self._stub.ListAgents,
                       admin_pb2.ListAgentsRequest(include_revoked=include_revoked))
        return [_agent(a) for a in r.agents]

    def get_agent(self, name: str) -> AgentInfo:
        return _agent(self._call(self._stub.GetAgent, admin_pb2.GetAgentRequest(name=name)))

    def issue_ssh_certificate(self, agent: str, *, validity_seconds: int = 0) -> SshCertificateInfo:
        """A short-lived OpenSSH user certificate for ``agent``'s SSH key (operator only)."""
        r = self._call(self._stub.IssueSshCertificate, admin_pb2.IssueSshCertificateRequest(
            agent=agent, validity_seconds=validity_seconds))
        return SshCertificateInfo(r.certificate, r.serial, list(r.principals), r.valid_after,
                                  r.valid_before, r.ca_public_key)

    def rotate_agent(self, name: str) -> AgentInfo:
        return _agent(self._call(self._stub.RotateAgent, admin_pb2.RotateAgentRequest(name=name)))

    def revoke_agent(self, name: str, reason: str = "") -> AgentInfo:
        return _agent(self._call(self._stub.RevokeAgent,
                                 admin_pb2.RevokeAgentRequest(name=name, reason=reason)))

    # -- step-ups, approvals, delegations, policy ---------------------------------

    def grant_bundle(self, agent: str, bundle: str, *, duration_seconds: int,
                     reason: str, context: Mapping[str, str] | None = None) -> GrantInfo:
        """``context``: the step-up applies only to requests carrying these pairs."""
        return _grant(self._call(self._stub.GrantBundle, admin_pb2.GrantBundleRequest(
            agent=agent, bundle=bundle, duration_seconds=duration_seconds, reason=reason,
            context=dict(context or {}))))

    def revoke_grant(self, grant_id: str) -> GrantInfo:
        return _grant(self._call(self._stub.RevokeGrant, admin_pb2.RevokeGrantRequest(id=grant_id)))

    def list_grants(self, include_inactive: bool = False) -> list[GrantInfo]:
        r = self._call(self._stub.ListGrants,
                       admin_pb2.ListGrantsRequest(include_inactive=include_inactive))
        return [_grant(g) for g in r.grants]

    def list_approvals(self) -> list[ApprovalInfo]:
        r = self._call(self._stub.ListApprovals, admin_pb2.ListApprovalsRequest())
        return [_approval(a) for a in r.approvals]

    def decide_approval(self, approval_id: str, *, approve: bool, comment: str = "") -> ApprovalInfo:
        return _approval(self._call(self._stub.DecideApproval, admin_pb2.DecideApprovalRequest(
            id=approval_id, approve=approve, comment=comment)))

    def list_delegations(self, include_inactive: bool = False) -> list[DelegationInfo]:
        r = self._call(self._stub.ListDelegations,
                       admin_pb2.ListDelegationsRequest(include_inactive=include_inactive))
        return [_delegation(d) for d in r.delegations]

    def revoke_delegation(self, delegation_id: str) -> DelegationInfo:
        return _delegation(self._call(self._stub.RevokeDelegation,
                                      admin_pb2.RevokeDelegationRequest(id=delegation_id)))

    def explain(self, *, pid: int, audience: str = "", scopes: Sequence[str] = (),
                kind: str = "token", agent: str | None = None, ttl_seconds: int = 0,
                delegation: str | None = None,
                context: Mapping[str, str] | None = None) -> Explanation:
        r = self._call(self._stub.ExplainPolicy, admin_pb2.ExplainPolicyRequest(
            pid=pid, agent=agent or "", kind=kind, audience=audience, scopes=list(scopes),
            ttl_seconds=ttl_seconds, delegation=delegation or "", context=dict(context or {})))
        return Explanation(r.allowed, r.agent, r.rule, r.bundle, r.reason, list(r.trace),
                           list(r.selectors), r.approval_required, r.ttl_seconds)

    def reload_policy(self) -> tuple[bool, str]:
        r = self._call(self._stub.ReloadPolicy, admin_pb2.ReloadPolicyRequest())
        return r.ok, r.error
