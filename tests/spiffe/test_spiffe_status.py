"""JWT-SVIDs carry a status claim too: they live as long as tokens, so revoking
the agent must reach relying parties that check the status list -- also
after a power loss cut the status-list journal (issue 21)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from badgeclient import AdminClient
from badgeclient.credentials import CredentialClient
from badgeclient.status import StatusListChecker, socket_fetcher
from badgeclient.verify import RevokedError
from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon, softhsm_available, start_daemon
from tests.e2e.test_context_status import POLICY

__all__ = ["softhsm_available"]

spiffe = pytest.importorskip("spiffe")
pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    out: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return out


def _checker(d: RunningDaemon) -> StatusListChecker:
    with CredentialClient(d.workload) as c:
        keys = {"keys": [c.trust_bundle().device_jwk]}
    return StatusListChecker(fetch=socket_fetcher(d.workload), keys=keys, max_age=0.01)


def test_jwt_svid_has_a_status_claim_and_revocation_reaches_it_across_a_power_loss(
        softhsm_available: None) -> None:
    base = short_tmpdir("bsv")
    os.chmod(base, 0o755)
    state = base / "s"
    d = start_daemon(state)
    try:
        (d.state / "policy.toml").write_text(POLICY)
        with AdminClient(d.admin) as a:
            assert a.reload_policy() == (True, "")
        client = spiffe.WorkloadApiClient(socket_path=f"unix://{d.workload}", default_timeout=10)
        try:
            svid = client.fetch_jwt_svid(audience={"demo"})
            bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(
                spiffe.TrustDomain("example.org"))
            # Still a valid JWT-SVID to the SPIFFE project's own validator.
            spiffe.JwtSvid.parse_and_validate(svid.token, bundle, "demo")
        finally:
            client.close()
        claims = _claims(svid.token)
        assert set(claims["status"]["status_list"]) == {"idx", "uri"}
        _checker(d).check(claims)  # valid
        d.stop(signal.SIGKILL)
        os.truncate(next(Path(state).rglob("status/journal")), 0)  # the power loss
        d = start_daemon(state)
        with AdminClient(d.admin) as a:
            a.revoke_agent("demo-agent", reason="svid test")
        time.sleep(0.02)
        with pytest.raises(RevokedError):
            _checker(d).check(claims)
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
