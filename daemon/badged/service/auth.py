"""Who is calling: from the connection's peer credentials and /proc, never the request."""

from __future__ import annotations

from badged.attest.process import ProcessAttributes
from badged.errors import PolicyDeniedError, UnauthenticatedError
from badged.listener.peers import PeerCredentials
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx


def caller_of(context: Ctx) -> PeerCredentials | None:
    """The peer snapshot the front attached to this call at accept, if any.

    The front hands the object itself to the call (``ServicerContext.caller``);
    there is no name to look up, so nothing a caller controls can select
    another connection's identity. A context without one (the connection
    closed, or not badged's front) has no caller.
    """
    caller = getattr(context, "caller", None)
    return caller if isinstance(caller, PeerCredentials) else None


def resolve_caller(deps: ServiceDeps, context: Ctx,
                   channel: str) -> tuple[PeerCredentials, ProcessAttributes]:
    """Attested identity of the caller of this RPC, checked for its channel.

    A call without the front's accept-time snapshot (its connection is gone)
    is UNAUTHENTICATED; a workload connection calling an admin method is
    PERMISSION_DENIED, so the admin API is reachable only through the admin
    socket.
    """
    peer = caller_of(context)
    if peer is None:
        raise UnauthenticatedError(f"no attested caller for {context.peer()[:80]!r}")
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
