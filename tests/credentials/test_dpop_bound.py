"""DPoP-bound tokens minted by FetchToken (RFC 9449 cnf.jkt): a stolen token is
useless without a proof from the agent's hardware key."""

from __future__ import annotations

import pytest

from badgeclient import WorkloadClient
from badgeclient.credentials import CredentialClient
from badgeclient.verify import DpopError, DpopRequest, Verifier
from tests.credentials.conftest import AGENT, RS
from tests.e2e.conftest import RunningDaemon

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def test_dpop_bound_token_needs_a_matching_proof(cred_daemon: RunningDaemon) -> None:
    with WorkloadClient(cred_daemon.workload) as w:
        jwks = w.jwks()
        bound = w.fetch_token(audience=RS, scopes=["read"], agent=AGENT, dpop_bound=True)
        plain = w.fetch_token(audience=RS, scopes=["read"], agent=AGENT)
    with CredentialClient(cred_daemon.workload) as c:
        proof = c.dpop_proof(htm="GET", htu=RS + "/orders", access_token=bound.token,
                             agent=AGENT).proof
        other = c.dpop_proof(htm="GET", htu=RS + "/orders", access_token=plain.token,
                             agent=AGENT).proof
    v = Verifier(jwks=jwks)
    ok = v.verify_token(bound.token, audience=RS,
                        dpop=DpopRequest(proof=proof, htm="GET", htu=RS + "/orders"),
                        require_dpop=True)
    # Direct mode: the token key is the DPoP key, so jkt is the token's own kid.
    assert ok.claims["cnf"] == {"jkt": bound.key_id}
    # Stolen bound token presented without a proof, or with a proof for another token.
    with pytest.raises(DpopError):
        Verifier(jwks=jwks).verify_token(bound.token, audience=RS, require_dpop=True)
    with pytest.raises(DpopError):
        Verifier(jwks=jwks).verify_token(
            bound.token, audience=RS, dpop=DpopRequest(proof=other, htm="GET",
                                                       htu=RS + "/orders"),
            require_dpop=True)
    # An unbound token carries no cnf at all.
    assert "cnf" not in Verifier(jwks=jwks).verify_token(plain.token, audience=RS).claims
