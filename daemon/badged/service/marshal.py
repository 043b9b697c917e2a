"""Domain ↔ protobuf, in one place; pb2 types never reach core/ or keystore/."""

from __future__ import annotations

from badged.identity.store import AgentRecord
from badged.sshagent.wire import ssh_line
from badged_proto.v1 import admin_pb2


def agent_to_pb(rec: AgentRecord, now: int) -> admin_pb2.Agent:
    keys = []
    for v in rec.versions:
        state = v.state
        if state == "retired" and v.publish_until <= now:
            state = "expired"
        keys.append(admin_pb2.KeyVersion(
            version=v.version, token_kid=v.token_kid, sign_kid=v.sign_kid, state=state,
            created_at=v.created_at, retired_at=v.retired_at, publish_until=v.publish_until,
            ssh_public_key=ssh_line(v.ssh_jwk, rec.spiffe_id) if v.ssh_jwk else ""))
    current = rec.current.version if rec.status == "active" else 0
    return admin_pb2.Agent(
        name=rec.name, spiffe_id=rec.spiffe_id, status=rec.status, current_version=current,
        keys=keys, created_at=rec.created_at, revoked_at=rec.revoked_at,
        revoke_reason=rec.revoke_reason, description=rec.description)
