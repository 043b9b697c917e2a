"""The code under test: an agent that calls the deploy API with a cached badged token."""

from badgeclient import TokenSource

DEPLOY_API = "https://deploy.example.com"


def deploy_headers(tokens: TokenSource) -> dict[str, str]:
    tok = tokens.token(DEPLOY_API, ["deploy:read"])
    return {"Authorization": f"Bearer {tok.token}"}
