"""The SPIFFE Workload API on badged's socket, exercised with py-spiffe -- the
SPIFFE project's own Python client, not badged code -- against a real daemon."""

from __future__ import annotations

import json

import grpc
import pytest

from tests.e2e.conftest import RunningDaemon, daemon, softhsm_available

__all__ = ["daemon", "softhsm_available"]

spiffe = pytest.importorskip("spiffe")
pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

AGENT_ID = "spiffe://example.org/agent/demo-agent"


def _client(d: RunningDaemon) -> object:
    return spiffe.WorkloadApiClient(socket_path=f"unix://{d.workload}", default_timeout=10)


def test_py_spiffe_fetches_and_validates_jwt_svids(daemon: RunningDaemon) -> None:
    from spiffe import JwtSource

    client = _client(daemon)
    try:
        svid = client.fetch_jwt_svid(audience={"https://api.example.com", "demo"})  # type: ignore[attr-defined]
        assert str(svid.spiffe_id) == AGENT_ID
        assert set(svid.audience) == {"https://api.example.com", "demo"}
        bundles = client.fetch_jwt_bundles()  # type: ignore[attr-defined]
        bundle = bundles.get_bundle_for_trust_domain(spiffe.TrustDomain("example.org"))
        assert bundle is not None and bundle.jwt_authorities
        # Validation by py-spiffe against the bundle (its own JWT library)...
        again = spiffe.JwtSvid.parse_and_validate(svid.token, bundle, "demo")
        assert str(again.spiffe_id) == AGENT_ID
        # ...and by the daemon's ValidateJWTSVID.
        checked = client.validate_jwt_svid(svid.token, "demo")  # type: ignore[attr-defined]
        assert str(checked.spiffe_id) == AGENT_ID
        from spiffe.workloadapi.errors import ValidateJwtSvidError

        with pytest.raises(ValidateJwtSvidError, match="audience"):
            client.validate_jwt_svid(svid.token, "https://not-for-me.example")  # type: ignore[attr-defined]
    finally:
        client.close()  # type: ignore[attr-defined]
    source = JwtSource(socket_path=f"unix://{daemon.workload}", timeout_in_seconds=10)
    try:
        assert str(source.fetch_svid(audience={"demo"}).spiffe_id) == AGENT_ID
    finally:
        source.close()


def test_jwt_svids_obey_policy_and_audit(daemon: RunningDaemon) -> None:
    client = _client(daemon)
    try:
        from spiffe.workloadapi.errors import FetchJwtSvidError

        with pytest.raises(FetchJwtSvidError) as info:
            client.fetch_jwt_svid(audience={"demo", "https://bank.example"})  # type: ignore[attr-defined]
        assert "audience not allowed" in str(info.value)
        with pytest.raises(FetchJwtSvidError, match="no identity issued"):
            client.fetch_jwt_svid(audience={"demo"},  # type: ignore[attr-defined]
                                  subject=spiffe.SpiffeId("spiffe://other.org/agent/demo-agent"))
        svid = client.fetch_jwt_svid(audience={"demo"})  # type: ignore[attr-defined]
    finally:
        client.close()  # type: ignore[attr-defined]
    from badged.audit import tail

    jti = json.loads(__import__("base64").urlsafe_b64decode(svid.token.split(".")[1] + "=="))["jti"]
    assert any(r.get("event") == "jwt_svid.issued" and r.get("jti") == jti
               for r in tail(daemon.state / "audit", 200))


def test_security_header_is_required(daemon: RunningDaemon) -> None:
    """Raw gRPC without `workload.spiffe.io: true` is refused, as the spec requires."""
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    with grpc.insecure_channel(f"unix:{daemon.workload}") as ch:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["demo"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "security header missing" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info2:
            next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10,
                                         metadata=(("workload.spiffe.io", "true"),))))
        assert info2.value.code() == grpc.StatusCode.UNIMPLEMENTED
