"""badgeclient.oauth against a real authlib authorization server on loopback
(tests/client/oauth_as.py), assertions and delegated tokens from a real
``badged dev`` on SoftHSM."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from badgeclient import PolicyDeniedError
from badgeclient.credentials import CredentialClient
from badgeclient.oauth import OAuthClient, OAuthError
from badgeclient.pytest_plugin import BadgedDev, TomlValue, start_badged_dev
from tests.client.oauth_as import AuthServer, serve
from tests.e2e.conftest import softhsm_available

__all__ = ["softhsm_available"]

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

AGENT = "oauth-agent"


@pytest.fixture(scope="module")
def world(softhsm_available: None) -> Iterator[tuple[BadgedDev, AuthServer]]:
    as_ = serve({}, set())
    uid = os.getuid()
    policy: dict[str, TomlValue] = {
        "bundle": {"as": {"audiences": [as_.token_url], "scopes": ["orders:read", "orders:write"],
                          "kinds": ["token", "assertion"], "max_ttl": "10m"}},
        "agent": [{"name": AGENT, "selectors": [f"unix:uid:{uid}"], "bundles": ["as"]}],
        # One uid plays the user and runs the agent, as on a single-user box.
        "delegation": {"allow": [f"unix:uid:{uid}"], "agents_may_delegate": True},
    }
    try:
        with start_badged_dev(policy=policy, agent=AGENT) as dev:
            as_.jwks = dev.client.jwks()
            as_.clients = {dev.client.whoami().agents[0].spiffe_id}
            yield dev, as_
    finally:
        assert as_.httpd is not None
        as_.httpd.shutdown()


def test_client_credentials_cached_and_used_on_the_api(world: tuple[BadgedDev, AuthServer]) -> None:
    dev, as_ = world
    spiffe_id = next(iter(as_.clients))
    with OAuthClient(as_.token_url, socket_path=dev.workload_socket) as oauth:
        tok = oauth.client_credentials(scopes=["orders:read"], resource=as_.origin + "/api")
        assert tok.scopes == ("orders:read",) and tok.access_token not in repr(tok)
        assert oauth.client_credentials(scopes=["orders:read"],
                                        resource=as_.origin + "/api") is tok
        assert oauth.requests == 1
        form = as_.token_requests[-1]
        assert form["grant_type"] == "client_credentials" and form["resource"] == as_.origin + "/api"
        # The API accepts it; the AS issued it to the agent itself.
        auth = oauth.auth(scopes=["orders:read"], resource=as_.origin + "/api")
        r = httpx.get(as_.origin + "/api/whoami", auth=auth)
        assert r.status_code == 200 and r.json()["sub"] == spiffe_id
        assert oauth.requests == 1
        # The API stops accepting it: dropped, a new one (with a new assertion), one retry.
        as_.revoked.add(tok.access_token)
        r = httpx.get(as_.origin + "/api/whoami", auth=auth)
        assert r.status_code == 200 and oauth.requests == 2
        assert as_.token_requests[-1]["client_assertion"] != form["client_assertion"]
    # An assertion is single-use at the AS: a replay of the one just sent is refused.
    replay = dict(as_.token_requests[-1])
    r = httpx.post(as_.token_url, data=replay)
    assert r.status_code == 400 and r.json()["error"] == "invalid_client"


def test_token_exchange_carries_the_delegation(world: tuple[BadgedDev, AuthServer]) -> None:
    dev, as_ = world
    agent_id = next(iter(as_.clients))
    deleg = dev.client.delegate(agent=AGENT, scopes=["orders:read"], audiences=[as_.token_url],
                                ttl_seconds=600)
    with OAuthClient(as_.token_url, socket_path=dev.workload_socket) as oauth:
        tok = oauth.token_exchange(delegation=deleg.id, scopes=["orders:read"])
        assert tok.issued_token_type == "urn:ietf:params:oauth:token-type:access_token"
        form = as_.token_requests[-1]
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
        r = httpx.get(as_.origin + "/api/whoami",
                      auth=oauth.auth(scopes=["orders:read"], delegation=deleg.id))
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["sub"].startswith("spiffe://") and "/user/" in seen["sub"]
        assert seen["act"] == {"sub": agent_id} and seen["scope"] == "orders:read"
        assert oauth.requests == 1  # the auth used the cached exchange
        # Beyond the delegation: the daemon will not mint the subject token.
        with pytest.raises(PolicyDeniedError):
            oauth.token_exchange(delegation=deleg.id, scopes=["orders:write"])
    # The AS checks the subject token itself: the agent's own token (no delegation)
    # presented as a user's is refused, though the client assertion is good.
    own = dev.client.fetch_token(audience=as_.token_url, scopes=["orders:read"])
    with CredentialClient(dev.workload_socket) as creds:
        assertion = creds.client_assertion(audience=as_.token_url).assertion
    r = httpx.post(as_.token_url, data={
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": own.token, "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert "no delegation" in r.json()["error_description"]


def test_refresh_keeps_the_cached_token_while_the_as_is_away(
        world: tuple[BadgedDev, AuthServer]) -> None:
    dev, as_ = world
    now = [1000.0]
    as_.expires_in = 100
    try:
        with OAuthClient(as_.token_url, socket_path=dev.workload_socket,
                         monotonic=lambda: now[0]) as oauth:
            first = oauth.client_credentials(scopes=["orders:read"])
            now[0] += 50  # before the refresh point (50 s of 100): cached
            assert oauth.client_credentials(scopes=["orders:read"]) is first
            now[0] += 25  # past it (80 s): refreshed
            second = oauth.client_credentials(scopes=["orders:read"])
            assert second is not first and oauth.requests == 2
            as_.down = True
            now[0] += 85  # past the refresh point again; the AS is away: the cached one
            assert oauth.client_credentials(scopes=["orders:read"]) is second
            now[0] += 20  # expired, AS still away: an error, not a dead token
            with pytest.raises(OAuthError) as info:
                oauth.client_credentials(scopes=["orders:read"])
            assert info.value.status == 503
            as_.down = False
            now[0] += 60  # past the backoff: works again
            assert oauth.client_credentials(scopes=["orders:read"]).access_token != second.access_token
    finally:
        as_.expires_in = 120
        as_.down = False


def test_plain_http_only_to_loopback() -> None:
    with pytest.raises(ValueError):
        OAuthClient("http://as.example.com/token")
    OAuthClient("http://127.0.0.1:9/token").close()
    OAuthClient("https://as.example.com/token").close()
