"""BadgeRequestsAuth (requests) against the same real loopback resource server as
the httpx tests (every request verified with the project's verifier), tokens
and DPoP proofs from a real ``badged dev``."""

from __future__ import annotations

import io
import logging

import pytest
import requests

from badgeclient.pytest_plugin import BadgedDev
from badgeclient.requests_auth import BadgeRequestsAuth
from tests.client.test_httpx_auth import AGENT, RS, ResourceServer, world
from tests.e2e.conftest import softhsm_available

__all__ = ["softhsm_available", "world"]

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def test_bearer_cached_and_invalid_token_retried_once(world: tuple[BadgedDev, ResourceServer]) -> None:
    dev, rs = world
    with dev.token_source() as tokens:
        auth = BadgeRequestsAuth(tokens, audience=RS, scopes=["read"])
        rs.seen.clear()
        with requests.Session() as s:
            s.auth = auth
            for _ in range(3):
                r = s.get(rs.origin + "/orders")
                assert r.status_code == 200, r.text
                assert r.json()["agent"].endswith("/" + AGENT)
        assert tokens.fetches == 1
        assert "ey" not in repr(auth)
        # The server refuses the cached token: dropped, a fresh one, one retry.
        first = tokens.token(RS, ["read"])
        rs.refuse.add(first.token)
        rs.seen.clear()
        r = requests.get(rs.origin + "/orders", auth=auth)
        assert r.status_code == 200
        assert [st for _, st, _ in rs.seen] == [401, 200]
        assert [h.status_code for h in r.history] == [401]
        assert tokens.token(RS, ["read"]).jti != first.jti
        # A server that refuses everything: one retry, then the 401 reaches the caller.
        rs.refuse_all = True
        rs.seen.clear()
        try:
            r = requests.get(rs.origin + "/orders", auth=auth)
        finally:
            rs.refuse_all = False
        assert r.status_code == 401
        assert [st for _, st, _ in rs.seen] == [401, 401]


def test_dpop_fresh_proof_per_request_and_nonce_retry(world: tuple[BadgedDev, ResourceServer],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    dev, rs = world
    caplog.set_level(logging.DEBUG)  # urllib3 and requests log at DEBUG: nothing may carry a token
    rs.seen.clear()
    with dev.token_source() as tokens:
        auth = BadgeRequestsAuth(tokens, audience=RS, scopes=["read"], agent=AGENT, dpop=True,
                                 socket_path=dev.workload_socket)
        with requests.Session() as s:
            s.auth = auth
            r = s.post(rs.origin + "/nonce/orders?x=1", data=b'{"id": 1}')
            assert r.status_code == 200, (r.text, rs.seen)
            assert r.json()["dpop"] is True
            r = s.get(rs.origin + "/nonce/orders")  # the nonce is remembered: no challenge
            assert r.status_code == 200, (r.text, rs.seen)
            r = s.get(rs.origin + "/orders")
            assert r.status_code == 200, (r.text, rs.seen)
            # A streamed body cannot be sent twice: the challenge comes back as is.
            rs.nonce = "n-2"
            r = s.post(rs.origin + "/nonce/orders", data=io.BytesIO(b"{}"))
            assert r.status_code == 401 and r.headers["DPoP-Nonce"] == "n-2"
            r = s.get(rs.origin + "/nonce/orders")  # ... but the new nonce is kept
            assert r.status_code == 200, (r.text, rs.seen)
        auth.close()
        assert tokens.fetches == 1
    assert [st for _, st, _ in rs.seen] == [401, 200, 200, 200, 401, 200]
    proofs = [h["dpop"] for h in rs.headers_seen[-6:]]
    assert len(set(proofs)) == 6
    token = rs.headers_seen[-1]["authorization"].split()[1]
    assert all(token not in rec.getMessage() and proof not in rec.getMessage()
               for rec in caplog.records for proof in proofs)
