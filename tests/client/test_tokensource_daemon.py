"""TokenSource against a real ``badged dev`` that is stopped and restarted.

The monotonic clock is offset by the test (to reach the refresh point and the
expiry without waiting minutes); the daemon, its sockets, the SoftHSM keys and
the tokens are real, and each token is checked with the project's verifier.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from badgeclient import WorkloadClient
from badgeclient.errors import PermissionDeniedError
from badgeclient.tokensource import CredentialExpiredError, TokenSource
from badgeclient.verify import Verifier
from tests.e2e.conftest import fresh_state, softhsm_available, start_daemon

__all__ = ["fresh_state", "softhsm_available"]

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

API = "https://api.example.com"


def test_cached_token_survives_a_daemon_restart(fresh_state: Path) -> None:
    offset = [0.0]
    d = start_daemon(fresh_state)
    try:
        with WorkloadClient(d.workload) as c:
            jwks = c.jwks()
        ts = TokenSource(d.workload, monotonic=lambda: time.monotonic() + offset[0],
                         backoff_initial=0.05, backoff_max=0.5)
        first = ts.token(API, ["read"])
        assert Verifier(jwks=jwks).verify_token(first.token, audience=API).scopes == ("read",)
        assert ts.token(API, ["read"]) is first
        assert ts.fetches == 1
        lifetime = first.expires_at - first.issued_at

        d.stop(signal.SIGKILL)  # a crash: the socket file stays, nobody listens on it
        # Daemon gone: the cached token is still served, also past the refresh point
        # (the background refresh fails and backs off without the caller noticing).
        assert ts.token(API, ["read"]) is first
        offset[0] += 0.85 * lifetime
        assert ts.token(API, ["read"]) is first
        deadline = time.monotonic() + 10
        while ts.fetches < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ts.fetches >= 2
        assert ts.token(API, ["read"]) is first
        # Past exp (on the monotonic clock): now the caller is told, with a typed error.
        offset[0] += 0.2 * lifetime
        with pytest.raises(CredentialExpiredError) as info:
            ts.token(API, ["read"])
        assert info.value.cause.status == "UNAVAILABLE"

        # The daemon comes back on the same state: a fresh channel, a fresh token.
        d = start_daemon(fresh_state)
        deadline = time.monotonic() + 10
        while True:
            try:
                second = ts.token(API, ["read"])
                break
            except CredentialExpiredError:
                assert time.monotonic() < deadline, "no token after the daemon came back"
                time.sleep(0.05)
        assert second.jti != first.jti
        assert Verifier(jwks=jwks).verify_token(second.token, audience=API).agent == first.spiffe_id
        ts.close()
    finally:
        d.stop()


def test_refusal_and_jwt_svid_from_a_real_daemon(fresh_state: Path) -> None:
    # An agent that also uses py-spiffe has its SPIFFE protos in protobuf's
    # default pool already (same unpackaged names as badged_proto.spiffe):
    # the JWT-SVID path must not collide with them.
    pytest.importorskip("spiffe._proto.workload_pb2")
    d = start_daemon(fresh_state)
    try:
        with TokenSource(d.workload) as ts:
            with pytest.raises(PermissionDeniedError) as info:
                ts.token("https://not-in-policy.example.com")
            assert info.value.code == "policy_denied"
            svid = ts.jwt_svid("demo")
            assert svid.spiffe_id.startswith("spiffe://example.org/")
            assert svid.expires_at > svid.issued_at
            assert ts.jwt_svid(["demo"]) is svid
            assert ts.fetches == 2
    finally:
        d.stop()
