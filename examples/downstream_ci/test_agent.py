"""One fixture, real tokens: what the agent sends is what the deploy API will verify."""

import pytest
from agent import DEPLOY_API, deploy_headers

from badgeclient import PermissionDeniedError
from badgeclient.verify import Verifier


def test_agent_sends_a_token_the_api_accepts(badged_dev) -> None:
    with badged_dev.token_source() as tokens:
        headers = deploy_headers(tokens)
        assert deploy_headers(tokens) == headers  # cached, not minted per call
    token = headers["Authorization"].removeprefix("Bearer ")
    verified = Verifier(jwks=badged_dev.client.jwks()).verify_token(token, audience=DEPLOY_API)
    assert verified.agent.endswith("/ci-bot")
    assert verified.scopes == ("deploy:read",)


def test_agent_cannot_exceed_its_policy(badged_dev) -> None:
    with pytest.raises(PermissionDeniedError):
        badged_dev.client.fetch_token(audience=DEPLOY_API, scopes=["deploy:write"])
