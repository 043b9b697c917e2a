"""The policy this project's tests run badged with: one agent, one API, one scope."""

import pytest

from badgeclient.pytest_plugin import simple_policy

DEPLOY_API = "https://deploy.example.com"


@pytest.fixture
def badged_policy() -> dict[str, object]:
    return simple_policy("ci-bot", audiences=[DEPLOY_API], scopes=["deploy:read"])
