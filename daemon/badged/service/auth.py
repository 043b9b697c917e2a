"""Who is calling: from the connection's peer credentials and /proc, never the request."""

from __future__ import annotations

from badged.attest.process import ProcessAttributes
from badged.errors import PolicyDeniedError, UnauthenticatedError
from badged.listener.peers import PeerCredentials
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx


def resolve_caller(deps: ServiceDeps, context: Ctx,
                   channel: str) -> tuple[PeerCredentials, ProcessAttributes]:
    """Attested identity of the caller of this RPC, checked for its channel.

    A peer name the front did not register (the connection is gone) is
    UNAUTHENTICATED; a workload connection calling an admin method is
    PERMISSION_DENIED, so the admin API is reachable only through the admin
    socket.
    """
    peer = deps.peers.lookup(context.peer())
    if peer is None:
        raise UnauthenticatedError(f"unregistered peer address {context.peer()[:80]!r}")
    if peer.channel != channel:
        raise PolicyDeniedError(
            f"{peer.channel} connection (uid {peer.uid}) called a {channel} method",
            public=f"this method is only served on the {channel} socket",
        )
    return peer, deps.attestor.attest(peer)


def require_operator(deps: ServiceDeps, proc: ProcessAttributes) -> None:
    """Admin is root, the daemon's own user, or a member of the operator group."""
    if proc.uid in deps.admin_uids:
        return
    gid = deps.operator_gid
    if gid is not None and (proc.gid == gid or gid in proc.groups):
        return
    raise PolicyDeniedError(f"uid {proc.uid} is not an operator",
                            public="caller is not an operator")
