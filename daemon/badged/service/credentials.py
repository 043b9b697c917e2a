"""Credential service: attested credential requests and proofs of possession.

Every RPC that hands out a credential is a kind of the one issuance pipeline
(:mod:`badged.service.issuance`: caller from the kernel, decision by policy
-- kinds ``assertion``, ``dpop`` and ``csr`` --, the caller's own agent key,
signing in the token, durable audit record, then the answer); the handlers
here validate, say what to mint, and marshal. The audit record names the
credential by ``jti``/serial and SHA-256, never by its bytes. A client
assertion's or attestation's client id is the agent's own SPIFFE ID unless
the policy lists another one for that agent (``client_ids``).

Keys: everything an agent presents is signed with its *token key* (the key
published in the JWKS and certified in its X.509 certificate), so one key
identifies the agent everywhere; the *device key* signs only what the device
vouches for (client attestations, evidence, agent certificates, the CRL).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from badged.attest.process import ProcessAttributes
from badged.core import assertions, dpop, evidence
from badged.core.x509 import build_csr, to_pem
from badged.enroll.agentca import AgentCertificateAuthority
from badged.enroll.device import device_id, device_spiffe_id, jwk_json
from badged.enroll.store import EnrollmentStore, IssuedCert
from badged.errors import FailedPreconditionError, InvalidRequestError
from badged.identity.registry import SigningKey
from badged.keystore.attest import KeyAttestation, KeyAttester
from badged.policy.model import Request
from badged.service import validate
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx
from badged.service.issuance import Authorized, Caller, Issuance, Minted
from badged_proto.v1 import credentials_pb2, credentials_pb2_grpc

_logger = logging.getLogger(__name__)

DEFAULT_ASSERTION_TTL = 60
POP_TTL = 60
MAX_CLIENT_ID = 256
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _der_b64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")


def _client_id(value: str) -> str:
    """The requested client id, bounded; ``""`` asks for the agent's own SPIFFE ID.
    Whether the caller may *use* it is the pipeline's decision."""
    if not value:
        return ""
    if len(value) > MAX_CLIENT_ID or not _PRINTABLE.match(value):
        raise InvalidRequestError("bad client_id",
                                  public=f"client_id must be 1-{MAX_CLIENT_ID} printable ASCII chars")
    return value


def _ttl(value: int, default: int, cap: int, what: str) -> int:
    if value == 0:
        return default
    if value > cap:
        raise InvalidRequestError(f"{what} ttl {value}", public=f"ttl_seconds must be 0..{cap}")
    return value


def _bad(exc: ValueError) -> InvalidRequestError:
    # core ValueErrors carry fixed phrases about the caller's own input.
    return InvalidRequestError(str(exc), public=str(exc))


def _origin(htu: str) -> str:
    parts = urlsplit(htu)
    return f"{parts.scheme}://{parts.netloc}"


class CredentialServicer(credentials_pb2_grpc.CredentialServiceServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps
        self._issue = Issuance(deps)
        self._enroll = EnrollmentStore(deps.state_dir)
        self._ca = AgentCertificateAuthority(self._enroll, device_key=deps.device_key)

    # -- shared steps (run inside a mint, where signatures run) ----------------------

    def _device_x5c(self) -> list[str]:
        chain = self._enroll.device_chain() or []
        return [_der_b64(c) for c in chain if c.issuer != c.subject]

    def _chain(self) -> list[x509.Certificate]:
        chain = self._enroll.device_chain()
        if not chain:
            raise FailedPreconditionError("device not enrolled",
                                          public="device is not enrolled (badgectl enroll)")
        return chain

    def _agent_cert(self, key: SigningKey, chain: list[x509.Certificate], caller: Caller,
                    rule: str) -> tuple[IssuedCert, Mapping[str, Any] | None]:
        """The agent's current certificate, issued when it has less than half
        its life left; with the audit record of a fresh issuance."""
        now = self._d.clock()
        issued = self._ca.current(key, now)
        if issued is not None:
            return issued, None
        try:
            issued = self._ca.issue(key, chain, now)
        except ValueError as exc:
            raise FailedPreconditionError(f"cannot issue: {exc}",
                                          public="device certificate has expired") from None
        return issued, {
            "event": "certificate.issued", "agent": key.agent, "caller": caller.summary(),
            "decision": "allow", "rule": rule, "kid": key.kid, "serial": f"{issued.serial:x}",
            "exp": issued.not_after, "credential_sha256": _sha256(issued.pem),
        }

    def _device_spiffe(self) -> str:
        return device_spiffe_id(self._d.trust_domain, device_id(self._d.device_key))

    def _evidence_claims(self, key: SigningKey, proc: ProcessAttributes, now: float,
                         ttl: int, nonce: str | None = None) -> dict[str, object]:
        store = self._d.keystore
        props = store.properties(key.handle.name)
        certify = None
        if isinstance(store, KeyAttester):
            # The TPM's own word, in addition to the attributes the store reports.
            def certify(nonce_bytes: bytes) -> KeyAttestation:
                return store.attest(key.handle.name, nonce_bytes)
        claims = evidence.build_evidence_claims(
            issuer=self._device_spiffe(), subject=key.spiffe_id, attested=key.handle.public_key(),
            props=props, now=now, ttl_seconds=ttl, nonce=nonce,
            workload={"uid": proc.uid, "exe_sha256": proc.exe_sha256}, certify=certify)
        claims["agent"] = key.spiffe_id
        return claims

    # -- RPCs ---------------------------------------------------------------------------

    async def ClientAssertion(self, request: credentials_pb2.ClientAssertionRequest,
                              context: Ctx) -> credentials_pb2.ClientAssertionResponse:
        d = self._d
        audience = validate.audience(request.audience)
        agent = validate.agent_name(request.agent)
        ttl = _ttl(request.ttl_seconds, DEFAULT_ASSERTION_TTL, assertions.MAX_ASSERTION_TTL,
                   "assertion")
        requested = _client_id(request.client_id)
        include_x5c = request.include_x5c
        caller = self._issue.caller(context)

        def mint(auth: Authorized) -> Minted[tuple[str, dict[str, Any]]]:
            key, client_id = auth.key, auth.client_id
            x5c: list[str] = []
            before: tuple[Mapping[str, Any], ...] = ()
            if include_x5c:
                chain = self._chain()
                issued, fresh = self._agent_cert(key, chain, caller, auth.decision.rule)
                before = (fresh,) if fresh is not None else ()
                x5c = [_der_b64(x509.load_pem_x509_certificate(issued.pem.encode("ascii")))]
                x5c += [_der_b64(c) for c in chain if c.issuer != c.subject]
            claims = assertions.client_assertion_claims(
                client_id=client_id, audience=audience, now=d.clock(), ttl_seconds=ttl,
                jti=d.new_jti())
            token = assertions.mint_client_assertion(claims, key.handle, key.kid, x5c=x5c)
            return Minted((token, claims), claims["sub"], {
                "request": {"audience": audience, "client_id": client_id, "ttl": ttl},
                "jti": claims["jti"], "exp": claims["exp"], "credential_sha256": _sha256(token),
            }, before)

        auth, (token, claims) = await self._issue.issue(
            caller, Request(kind="assertion", agent=agent, audience=audience, ttl=ttl),
            "assertion.issued", d.agents.token_key, mint, client_id=requested)
        key = auth.key
        return credentials_pb2.ClientAssertionResponse(
            assertion=token, agent=key.agent, spiffe_id=key.spiffe_id, client_id=auth.client_id,
            jti=claims["jti"], expires_at=claims["exp"], key_id=key.kid)

    async def ClientAttestation(self, request: credentials_pb2.ClientAttestationRequest,
                                context: Ctx) -> credentials_pb2.ClientAttestationResponse:
        d = self._d
        audience = validate.audience(request.audience)
        agent = validate.agent_name(request.agent)
        # 0: the policy's default lifetime (the daemon default capped by the
        # bundle), like tokens; an explicit ttl is checked against the cap.
        requested_ttl = _ttl(request.ttl_seconds, 0, assertions.MAX_ATTESTATION_TTL,
                             "attestation")
        challenge = request.challenge or None
        if challenge is not None and (len(challenge) > 512 or not _PRINTABLE.match(challenge)):
            raise InvalidRequestError("bad challenge",
                                      public="challenge must be 1-512 printable ASCII chars")
        requested = _client_id(request.client_id)
        caller = self._issue.caller(context)

        def mint(auth: Authorized) -> Minted[tuple[str, str, int, str]]:
            # Three hardware operations (certify, device and agent signatures).
            key, client_id = auth.key, auth.client_id
            ttl = requested_ttl or auth.decision.ttl
            now = d.clock()
            pop_claims = assertions.attestation_pop_claims(
                client_id=client_id, audience=audience, now=now, ttl_seconds=POP_TTL,
                jti=d.new_jti(), challenge=challenge)
            ev = self._evidence_claims(key, caller.proc, now, ttl)
            att_claims = assertions.client_attestation_claims(
                attester=self._device_spiffe(), client_id=client_id,
                agent_key=key.handle.public_key(), now=now, ttl_seconds=ttl, evidence=ev)
            attestation = assertions.mint_client_attestation(att_claims, d.device_key,
                                                             x5c=self._device_x5c())
            pop = assertions.mint_attestation_pop(pop_claims, key.handle)
            return Minted((attestation, pop, att_claims["exp"], pop_claims["jti"]),
                          att_claims["sub"], {
                "request": {"audience": audience, "client_id": client_id, "ttl": ttl},
                "jti": pop_claims["jti"], "exp": att_claims["exp"],
                "credential_sha256": _sha256(attestation), "pop_sha256": _sha256(pop),
                "hwkey": ev.get("hwkey"),
            })

        auth, (attestation, pop, exp, pop_jti) = await self._issue.issue(
            caller, Request(kind="assertion", agent=agent, audience=audience, ttl=requested_ttl),
            "attestation.issued", d.agents.token_key, mint, client_id=requested)
        key = auth.key
        return credentials_pb2.ClientAttestationResponse(
            client_attestation=attestation, client_attestation_pop=pop, agent=key.agent,
            spiffe_id=key.spiffe_id, client_id=auth.client_id, expires_at=exp, pop_jti=pop_jti)

    async def DpopProof(self, request: credentials_pb2.DpopProofRequest,
                        context: Ctx) -> credentials_pb2.DpopProofResponse:
        d = self._d
        agent = validate.agent_name(request.agent)
        try:
            htm = dpop.check_method(request.htm)
            htu = dpop.normalize_htu(request.htu)
        except ValueError as exc:
            raise _bad(exc) from None
        access_token = request.access_token or None
        nonce = request.nonce or None
        caller = self._issue.caller(context)

        def mint(auth: Authorized) -> Minted[tuple[str, dict[str, Any]]]:
            key = auth.key
            try:
                claims = dpop.proof_claims(htm=htm, htu=htu, now=d.clock(), jti=d.new_jti(),
                                           access_token=access_token, nonce=nonce)
            except ValueError as exc:
                raise _bad(exc) from None
            proof = dpop.mint_proof(claims, key.handle)
            # A proof names no subject: it speaks for the key, the agent's own.
            return Minted((proof, claims), key.spiffe_id, {
                "request": {"htm": htm, "htu": htu, "bound_token": "ath" in claims,
                            "nonce": nonce is not None},
                "jti": claims["jti"], "credential_sha256": _sha256(proof),
            })

        auth, (proof, claims) = await self._issue.issue(
            caller, Request(kind="dpop", agent=agent, audience=_origin(htu)), "dpop.issued",
            d.agents.token_key, mint)
        key = auth.key
        return credentials_pb2.DpopProofResponse(proof=proof, jkt=key.kid, jti=claims["jti"],
                                                 issued_at=claims["iat"], agent=key.agent)

    async def CreateCsr(self, request: credentials_pb2.CreateCsrRequest,
                        context: Ctx) -> credentials_pb2.CreateCsrResponse:
        d = self._d
        agent = validate.agent_name(request.agent)
        caller = self._issue.caller(context)

        def mint(auth: Authorized) -> Minted[tuple[str, str]]:
            key = auth.key
            ev = evidence.sign_evidence(self._evidence_claims(key, caller.proc, d.clock(), 3600),
                                        device_key=d.device_key, x5c=self._device_x5c())
            csr = build_csr(key.handle, common_name=key.agent, uris=[key.spiffe_id],
                            evidence=ev.encode("ascii"))
            pem = to_pem(csr)
            return Minted((pem, ev), key.spiffe_id, {"credential_sha256": _sha256(pem)})

        auth, (pem, ev) = await self._issue.issue(
            caller, Request(kind="csr", agent=agent), "csr.issued", d.agents.token_key, mint)
        key = auth.key
        return credentials_pb2.CreateCsrResponse(csr_pem=pem, evidence=ev, agent=key.agent,
                                                 spiffe_id=key.spiffe_id)

    async def GetAgentCertificate(self, request: credentials_pb2.GetAgentCertificateRequest,
                                  context: Ctx) -> credentials_pb2.GetAgentCertificateResponse:
        agent = validate.agent_name(request.agent)
        caller = self._issue.caller(context)

        def mint(auth: Authorized) -> Minted[tuple[IssuedCert, list[x509.Certificate]]]:
            key = auth.key
            chain = self._chain()
            issued, fresh = self._agent_cert(key, chain, caller, auth.decision.rule)
            # A fresh certificate gets its own certificate.issued record first;
            # every answer, fresh or not, is recorded as served.
            return Minted((issued, chain), key.spiffe_id, {
                "serial": f"{issued.serial:x}", "exp": issued.not_after,
                "credential_sha256": _sha256(issued.pem), "fresh": fresh is not None,
            }, (fresh,) if fresh is not None else ())

        auth, (issued, chain) = await self._issue.issue(
            caller, Request(kind="csr", agent=agent), "certificate.served",
            self._d.agents.token_key, mint)
        key = auth.key
        return credentials_pb2.GetAgentCertificateResponse(
            certificate_pem=issued.pem,
            chain_pem="".join(to_pem(c) for c in chain if c.issuer != c.subject),
            not_before=issued.not_before, not_after=issued.not_after,
            serial_hex=f"{issued.serial:x}", agent=key.agent, spiffe_id=key.spiffe_id)

    async def GetTrustBundle(self, request: credentials_pb2.GetTrustBundleRequest,
                             context: Ctx) -> credentials_pb2.GetTrustBundleResponse:
        # Public material only: served to any caller, attested or not (like JWKS).
        d = self._d
        chain = self._enroll.device_chain()
        resp = credentials_pb2.GetTrustBundleResponse(
            enrolled=bool(chain), device_id=device_id(d.device_key),
            device_jwk_json=jwk_json(d.device_key.public_key()))
        if chain:
            resp.device_chain_pem = "".join(to_pem(c) for c in chain)
            resp.crl_pem = self._ca.crl(d.agents, chain, d.clock())
        return resp


def add_to_server(server: grpc.aio.Server, deps: ServiceDeps) -> None:
    credentials_pb2_grpc.add_CredentialServiceServicer_to_server(CredentialServicer(deps), server)

