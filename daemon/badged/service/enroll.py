"""Enrollment service: operators only, admin socket only.

The device key never leaves the token: enrollment produces a CSR signed by
it (with its attestation evidence inside), and later accepts the chain the
operator's CA issued -- after checking that the chain is for *this* key,
lets the device issue agent certificates, is valid now and is linked by
signatures. The trust decision about the root is the relying parties'.

A TPM device also answers the CA's credential-activation challenge
(ActivateEnrollment): TPM2_ActivateCredential with its EK and AK returns the
secret the CA wrapped, which is what lets the CA trust the AK's TPM2_Certify
of the device key (badged.enroll.activation).
"""

from __future__ import annotations

import json
import logging

import grpc
from cryptography import x509

from badged.attest.process import ProcessAttributes
from badged.core.x509 import device_attestation, load_pem_chain, permitted_agents
from badged.enroll import activation
from badged.enroll.device import (
    ChainRejected,
    check_device_chain,
    device_id,
    device_spiffe_id,
    enrollment_request,
    summarize,
)
from badged.enroll.store import EnrollmentStore
from badged.errors import FailedPreconditionError, InvalidRequestError
from badged.keystore.attest import KeyAttestation, KeyAttester
from badged.service.auth import require_operator, resolve_caller
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx
from badged_proto.v1 import enroll_pb2, enroll_pb2_grpc

_logger = logging.getLogger(__name__)

MAX_CHAIN_PEM = 64 * 1024
MAX_NONCE = 256


def _statement(leaf: x509.Certificate) -> str:
    raw = device_attestation(leaf)
    if raw is None:
        return ""
    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    return str(doc.get("evidence", "")) if isinstance(doc, dict) else ""


class EnrollmentServicer(enroll_pb2_grpc.EnrollmentServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps
        self._store = EnrollmentStore(deps.state_dir)

    def _operator(self, context: Ctx) -> ProcessAttributes:
        _, proc = resolve_caller(self._d, context, "admin")
        require_operator(self._d, proc)
        return proc

    def _ids(self) -> tuple[str, str]:
        dev = device_id(self._d.device_key)
        return dev, device_spiffe_id(self._d.trust_domain, dev)

    def _status(self) -> enroll_pb2.EnrollmentStatus:
        dev, spiffe = self._ids()
        chain = self._store.device_chain()
        if not chain:
            return enroll_pb2.EnrollmentStatus(enrolled=False, device_id=dev, spiffe_id=spiffe)
        s = summarize(chain, dev, spiffe)
        agents = permitted_agents(chain[0])
        return enroll_pb2.EnrollmentStatus(
            enrolled=True, device_id=dev, spiffe_id=spiffe, subject=s.subject, issuer=s.issuer,
            not_before=s.not_before, not_after=s.not_after,
            fingerprint_sha256=s.fingerprint_sha256, attestation=_statement(chain[0]),
            permitted_agents=sorted(agents or ()), any_agent=agents is None)

    async def RequestEnrollment(self, request: enroll_pb2.RequestEnrollmentRequest,
                                context: Ctx) -> enroll_pb2.RequestEnrollmentResponse:
        d = self._d
        nonce = request.nonce or None
        if nonce is not None and (len(nonce) > MAX_NONCE or not nonce.isprintable()):
            raise InvalidRequestError("bad nonce", public=f"nonce: at most {MAX_NONCE} printable chars")
        proc = self._operator(context)
        store = d.keystore
        certify = None
        if isinstance(store, KeyAttester):
            def certify(nonce_bytes: bytes) -> KeyAttestation:
                return store.attest(d.device_key.name, nonce_bytes)
        agents = [a.name for a in d.agents.list()]
        # Reading the key's properties (TPM ReadPublic), the CSR signature and
        # (TPM) the certify are hardware calls: off the loop where the device's
        # signatures run.
        doc = await d.signing.run(lambda: enrollment_request(
            device_key=d.device_key, props=store.properties(d.device_key.name),
            trust_domain=d.trust_domain, now=d.clock(), nonce=nonce, certify=certify,
            agents=agents))
        await d.audit.append({"event": "enrollment.requested", "caller": proc.summary(),
                              "decision": "allow", "device_id": doc["device_id"]})
        return enroll_pb2.RequestEnrollmentResponse(
            request_json=json.dumps(doc, indent=2), device_id=doc["device_id"])

    async def ActivateEnrollment(self, request: enroll_pb2.ActivateEnrollmentRequest,
                                 context: Ctx) -> enroll_pb2.ActivateEnrollmentResponse:
        d = self._d
        if len(request.challenge_json) > activation.MAX_DOCUMENT:
            raise InvalidRequestError("challenge too large", public="challenge_json: at most 16 KiB")
        proc = self._operator(context)
        store = d.keystore
        if not isinstance(store, activation.CredentialActivator):
            raise FailedPreconditionError(
                "key store cannot activate credentials",
                public="this device has no TPM: credential activation is for TPM devices")
        challenge = activation.parse_challenge(request.challenge_json.encode("utf-8", "replace"))
        dev, _ = self._ids()
        try:
            # A TPM call (~10-35 ms on swtpm, more on hardware): off the event
            # loop where the device's signatures run.
            doc = await d.signing.run(lambda: activation.activate(challenge, store, device_id=dev,
                                                                  now=d.clock()))
        except activation.ActivationRejected as exc:
            await d.audit.append({"event": "enrollment.activation_refused",
                                  "caller": proc.summary(), "decision": "deny",
                                  "reason": exc.reason, "request_sha256": challenge.request_sha256})
            raise
        await d.audit.append({"event": "enrollment.activated", "caller": proc.summary(),
                              "decision": "allow", "device_id": dev,
                              "request_sha256": challenge.request_sha256})
        return enroll_pb2.ActivateEnrollmentResponse(response_json=json.dumps(doc, indent=2))

    async def ImportDeviceCertificate(self, request: enroll_pb2.ImportDeviceCertificateRequest,
                                      context: Ctx) -> enroll_pb2.EnrollmentStatus:
        d = self._d
        if len(request.chain_pem) > MAX_CHAIN_PEM:
            raise InvalidRequestError("chain too large", public="chain_pem: at most 64 KiB")
        proc = self._operator(context)
        try:
            chain = load_pem_chain(request.chain_pem.encode("ascii", "replace"))
        except ValueError:
            raise InvalidRequestError("chain is not PEM",
                                      public="chain_pem must be PEM certificates") from None
        try:
            check_device_chain(chain, device_key=d.device_key, trust_domain=d.trust_domain,
                               now=d.clock())
        except ChainRejected as exc:
            await d.audit.append({"event": "enrollment.refused", "caller": proc.summary(),
                                  "decision": "deny", "reason": exc.reason})
            raise InvalidRequestError(str(exc), public=f"chain refused: {exc.reason}") from None
        self._store.save_device_chain(chain)
        status = self._status()
        await d.audit.append({"event": "device.enrolled", "caller": proc.summary(),
                              "decision": "allow", "device_id": status.device_id,
                              "issuer": status.issuer, "not_after": status.not_after,
                              "fingerprint_sha256": status.fingerprint_sha256})
        _logger.info("device enrolled", extra={"device": status.device_id,
                                               "not_after": status.not_after})
        return status

    async def GetEnrollmentStatus(self, request: enroll_pb2.GetEnrollmentStatusRequest,
                                  context: Ctx) -> enroll_pb2.EnrollmentStatus:
        self._operator(context)
        return self._status()


def add_to_server(server: grpc.aio.Server, deps: ServiceDeps) -> None:
    enroll_pb2_grpc.add_EnrollmentServiceServicer_to_server(EnrollmentServicer(deps), server)
