"""Client for badged's credential and enrollment services.

Agent side (workload socket)::

    from badgeclient.credentials import CredentialClient

    with CredentialClient() as c:
        a = c.client_assertion(audience="https://as.example.com/token", client_id="my-client")
        form = {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": a.assertion}
        p = c.dpop_proof(htm="GET", htu="https://api.example.com/orders", access_token=tok)
        headers = {"Authorization": f"DPoP {tok}", "DPoP": p.proof}

Operator side (admin socket): :class:`EnrollmentClient`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from badgeclient.client import DEFAULT_ADMIN_SOCKET, DEFAULT_SOCKET, _Base
from badged_proto.v1 import credentials_pb2, credentials_pb2_grpc, enroll_pb2, enroll_pb2_grpc

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientAssertion:
    assertion: str
    agent: str
    spiffe_id: str
    client_id: str
    jti: str
    expires_at: int
    key_id: str

    def __repr__(self) -> str:
        return f"ClientAssertion(agent={self.agent!r}, jti={self.jti!r}, <{len(self.assertion)} chars>)"


@dataclass(frozen=True)
class ClientAttestation:
    attestation: str
    pop: str
    agent: str
    spiffe_id: str
    client_id: str
    expires_at: int
    pop_jti: str

    def headers(self) -> dict[str, str]:
        """The two HTTP headers of attestation-based client authentication."""
        return {"OAuth-Client-Attestation": self.attestation,
                "OAuth-Client-Attestation-PoP": self.pop}

    def __repr__(self) -> str:
        return f"ClientAttestation(agent={self.agent!r}, client_id={self.client_id!r})"


@dataclass(frozen=True)
class DpopProof:
    proof: str
    jkt: str
    jti: str
    issued_at: int
    agent: str

    def __repr__(self) -> str:
        return f"DpopProof(agent={self.agent!r}, jti={self.jti!r})"


@dataclass(frozen=True)
class Csr:
    csr_pem: str
    evidence: str
    agent: str
    spiffe_id: str


@dataclass(frozen=True)
class AgentCertificate:
    certificate_pem: str
    chain_pem: str
    not_before: int
    not_after: int
    serial_hex: str
    agent: str
    spiffe_id: str


@dataclass(frozen=True)
class TrustBundle:
    enrolled: bool
    device_id: str
    device_chain_pem: str
    crl_pem: str
    device_jwk: dict[str, Any]


@dataclass(frozen=True)
class EnrollmentStatus:
    enrolled: bool
    device_id: str
    spiffe_id: str
    subject: str
    issuer: str
    not_before: int
    not_after: int
    fingerprint_sha256: str
    attestation: str = ""
    permitted_agents: tuple[str, ...] = ()
    any_agent: bool = True


class CredentialClient(_Base):
    """Attested credential requests and proofs, for agent processes."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 timeout: float = 30.0) -> None:
        super().__init__(socket_path or os.environ.get("BADGED_SOCKET") or DEFAULT_SOCKET, timeout)
        self._stub = credentials_pb2_grpc.CredentialServiceStub(self._channel)

    def client_assertion(self, *, audience: str, client_id: str = "", ttl_seconds: int = 0,
                         agent: str | None = None, include_x5c: bool = False) -> ClientAssertion:
        r = self._call(self._stub.ClientAssertion, credentials_pb2.ClientAssertionRequest(
            agent=agent or "", audience=audience, client_id=client_id, ttl_seconds=ttl_seconds,
            include_x5c=include_x5c))
        return ClientAssertion(r.assertion, r.agent, r.spiffe_id, r.client_id, r.jti,
                               r.expires_at, r.key_id)

    def client_attestation(self, *, audience: str, client_id: str = "", challenge: str = "",
                           ttl_seconds: int = 0, agent: str | None = None) -> ClientAttestation:
        r = self._call(self._stub.ClientAttestation, credentials_pb2.ClientAttestationRequest(
            agent=agent or "", audience=audience, client_id=client_id, challenge=challenge,
            ttl_seconds=ttl_seconds))
        return ClientAttestation(r.client_attestation, r.client_attestation_pop, r.agent,
                                 r.spiffe_id, r.client_id, r.expires_at, r.pop_jti)

    def dpop_proof(self, *, htm: str, htu: str, access_token: str = "", nonce: str = "",
                   agent: str | None = None) -> DpopProof:
        r = self._call(self._stub.DpopProof, credentials_pb2.DpopProofRequest(
            agent=agent or "", htm=htm, htu=htu, access_token=access_token, nonce=nonce))
        return DpopProof(r.proof, r.jkt, r.jti, r.issued_at, r.agent)

    def create_csr(self, *, agent: str | None = None) -> Csr:
        r = self._call(self._stub.CreateCsr, credentials_pb2.CreateCsrRequest(agent=agent or ""))
        return Csr(r.csr_pem, r.evidence, r.agent, r.spiffe_id)

    def agent_certificate(self, *, agent: str | None = None) -> AgentCertificate:
        r = self._call(self._stub.GetAgentCertificate,
                       credentials_pb2.GetAgentCertificateRequest(agent=agent or ""))
        return AgentCertificate(r.certificate_pem, r.chain_pem, r.not_before, r.not_after,
                                r.serial_hex, r.agent, r.spiffe_id)

    def trust_bundle(self) -> TrustBundle:
        r = self._call(self._stub.GetTrustBundle, credentials_pb2.GetTrustBundleRequest())
        return TrustBundle(r.enrolled, r.device_id, r.device_chain_pem, r.crl_pem,
                           json.loads(r.device_jwk_json or "{}"))


def _status(r: enroll_pb2.EnrollmentStatus) -> EnrollmentStatus:
    return EnrollmentStatus(r.enrolled, r.device_id, r.spiffe_id, r.subject, r.issuer,
                            r.not_before, r.not_after, r.fingerprint_sha256, r.attestation,
                            tuple(r.permitted_agents), r.any_agent)


class EnrollmentClient(_Base):
    """Device enrollment, for operators on the admin socket."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 timeout: float = 30.0) -> None:
        super().__init__(socket_path or os.environ.get("BADGED_ADMIN_SOCKET")
                         or DEFAULT_ADMIN_SOCKET, timeout)
        self._stub = enroll_pb2_grpc.EnrollmentServiceStub(self._channel)

    def request(self, nonce: str = "") -> str:
        """The enrollment request file (JSON) for the operator's CA."""
        r = self._call(self._stub.RequestEnrollment, enroll_pb2.RequestEnrollmentRequest(nonce=nonce))
        return r.request_json

    def activate(self, challenge_json: str) -> str:
        """Answer the CA's credential-activation challenge with this device's TPM."""
        r = self._call(self._stub.ActivateEnrollment,
                       enroll_pb2.ActivateEnrollmentRequest(challenge_json=challenge_json))
        return r.response_json

    def import_chain(self, chain_pem: str) -> EnrollmentStatus:
        return _status(self._call(self._stub.ImportDeviceCertificate,
                                  enroll_pb2.ImportDeviceCertificateRequest(chain_pem=chain_pem)))

    def status(self) -> EnrollmentStatus:
        return _status(self._call(self._stub.GetEnrollmentStatus,
                                  enroll_pb2.GetEnrollmentStatusRequest()))
