"""A TPM-backed daemon (``badged dev --backend tpm``, a real swtpm): the
client attestation carries the TPM's own TPM2_Certify of the agent key,
which a relying party checks with badged.core.tpm_evidence's rules."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator

import pytest

from badgeclient.credentials import CredentialClient
from badgeclient.verify import Verifier
from tests.conftest import short_tmpdir
from tests.credentials.conftest import AGENT, AS_ISSUER, policy
from tests.e2e.conftest import RunningDaemon, start_daemon

pytestmark = [pytest.mark.tpm, pytest.mark.slow]


@pytest.fixture(scope="module")
def tpm_daemon(swtpm_provisioned: object) -> Iterator[RunningDaemon]:
    base = short_tmpdir("bct")
    os.chmod(base, 0o755)
    state = base / "s"
    state.mkdir(mode=0o755)
    (state / "policy.toml").write_text(policy(os.getuid(), os.getgid()))
    d = start_daemon(state, "--backend", "tpm", timeout=60)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_attestation_from_tpm_daemon_carries_tpm2_certify(tpm_daemon: RunningDaemon) -> None:
    from badgeclient.verify import public_key_from_jwk
    from badged.core import evidence as ev
    from badged.core.jose import b64url_decode
    from badged.core.tpm_evidence import verify_certify
    from badged.keystore.attest import FORMAT_TPM2_CERTIFY, KeyAttestation

    with CredentialClient(tpm_daemon.workload) as c:
        att = c.client_attestation(audience=AS_ISSUER, client_id="oauth-client-1", agent=AGENT)
        bundle = c.trust_bundle()
    claims = json.loads(base64.urlsafe_b64decode(att.attestation.split(".")[1] + "=="))
    assert claims["eat_profile"] == ev.TPM2_CERTIFY_PROFILE and claims["hwkey"]["backend"] == "tpm"
    r = Verifier(jwks={"keys": [bundle.device_jwk]}).verify_client_attestation(
        att.attestation, att.pop, audience=AS_ISSUER)
    assert r.attestation is not None and r.attestation.profile == ev.TPM2_CERTIFY_PROFILE
    # the relying party recomputes the certify nonce from the claims and checks the quote
    agent_key = public_key_from_jwk(claims["cnf"]["jwk"])
    certify = claims["tpm2_certify"]
    nonce = ev.certify_nonce(attested=agent_key, iat=claims["iat"], eat_nonce=None)
    verified = verify_certify(KeyAttestation(
        format=FORMAT_TPM2_CERTIFY, key_name="", nonce=nonce,
        attest=b64url_decode(certify["attest"]), signature=b64url_decode(certify["signature"]),
        ak_public=b64url_decode(certify["ak_public"]),
        key_public=b64url_decode(certify["key_public"]),
        ek_certificate=b64url_decode(certify["ek_certificate"])
        if "ek_certificate" in certify else None), nonce, expected_public_key=agent_key)
    assert verified.public_key.public_numbers() == agent_key.public_numbers()
