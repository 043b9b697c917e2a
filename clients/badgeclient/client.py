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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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


def _agent(pb: admin_pb2.Agent) -> AgentInfo:
    return AgentInfo(
        name=pb.name, spiffe_id=pb.spiffe_id, status=pb.status,
        current_version=pb.current_version,
        keys=[KeyVersionInfo(k.version, k.token_kid, k.sign_kid, k.state, k.created_at,
                             k.retired_at, k.publish_until) for k in pb.keys],
        created_at=pb.created_at, revoked_at=pb.revoked_at, revoke_reason=pb.revoke_reason,
        description=pb.description)


class _Base:
    def __init__(self, socket_path: str | os.PathLike[str], timeout: float) -> None:
        self.socket_path = Path(_socket_target(socket_path)[len("unix:"):])
        self._timeout = timeout
        self._channel = grpc.insecure_channel(_socket_target(socket_path))

    def _call(self, fn: Callable[..., T], request: Any) -> T:
        try:
            self.socket_path.stat()
        except FileNotFoundError:
            raise UnavailableError(f"no badged socket at {self.socket_path} (is the daemon running?)",
                                   status="UNAVAILABLE") from None
        except PermissionError:
            raise UnavailableError(f"permission denied reaching {self.socket_path}",
                                   status="UNAVAILABLE") from None
        try:
            return fn(request, timeout=self._timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkloadClient(_Base):
    """For agent processes: tokens, signatures, the JWKS, and ``whoami``."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 timeout: float = 30.0) -> None:
        super().__init__(socket_path or os.environ.get("BADGED_SOCKET") or DEFAULT_SOCKET, timeout)
        self._stub = workload_pb2_grpc.WorkloadServiceStub(self._channel)

    def fetch_token(self, *, audience: str, scopes: Sequence[str] = (), ttl_seconds: int = 0,
                    agent: str | None = None) -> Token:
        r = self._call(self._stub.FetchToken, workload_pb2.FetchTokenRequest(
            agent=agent or "", audience=audience, scopes=list(scopes), ttl_seconds=ttl_seconds))
        return Token(r.token, r.agent, r.spiffe_id, r.issued_at, r.expires_at, r.jti, r.key_id)

    def sign(self, data: bytes, *, context: str = "", agent: str | None = None) -> Signature:
        r = self._call(self._stub.Sign, workload_pb2.SignRequest(
            agent=agent or "", data=data, context=context))
        return Signature(r.signature, r.algorithm, r.key_id, r.signed_message, r.public_key_pem,
                         r.agent)

    def jwks(self) -> dict[str, Any]:
        r = self._call(self._stub.GetJwks, workload_pb2.GetJwksRequest())
        doc: dict[str, Any] = json.loads(r.jwks_json)
        return doc

    def whoami(self) -> WhoAmI:
        r = self._call(self._stub.WhoAmI, workload_pb2.WhoAmIRequest())
        p = r.process
        return WhoAmI(
            pid=p.pid, uid=p.uid, gid=p.gid, exe=p.exe, exe_sha256=p.exe_sha256,
            selectors=list(p.selectors),
            agents=[AgentMatch(a.agent, a.spiffe_id, a.rule, list(a.audiences), list(a.scopes),
                               a.max_ttl_seconds, list(a.kinds)) for a in r.agents],
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

    def rotate_agent(self, name: str) -> AgentInfo:
        return _agent(self._call(self._stub.RotateAgent, admin_pb2.RotateAgentRequest(name=name)))

    def revoke_agent(self, name: str, reason: str = "") -> AgentInfo:
        return _agent(self._call(self._stub.RevokeAgent,
                                 admin_pb2.RevokeAgentRequest(name=name, reason=reason)))
