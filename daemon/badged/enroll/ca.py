"""A small operator CA for labs and tests (``badgectl ca init|sign``).

Its key lives in a token too (a SoftHSM token of its own under the CA
directory), and it signs nothing before it has checked the request:

1. the CSR is signed by the key it names (possession of the device key);
2. the evidence embedded in the CSR is signed by that same key and attests
   *that* key (not another one) as sensitive, never extractable and
   generated in the token;
3. the CSR names ``spiffe://TD/device/<thumbprint of its key>`` in an
   allowed trust domain;
4. TPM evidence (TPM2_Certify by an AK) counts only with a pinned EK CA and
   after credential activation (badged.enroll.activation): ``badgectl ca
   challenge`` wraps a secret to the EK for the AK's Name, the device's TPM
   unwraps it, ``badgectl ca sign --response`` checks it. Without that, the
   AK could be a software key next to a copied EK certificate.

What the CA verified is written into the device certificate
(DEVICE_ATTESTATION_OID: ``tpm2-activated-ak`` with the AK Name, or
``token-statement``: the token's own word about its key), and which agents
the device may vouch for into its name constraints.

Production uses the organization's CA with the same files: the request is a
standard PKCS#10 CSR plus a JSON wrapper, and the evidence check is
:func:`badged.core.evidence.check_evidence`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from badged.core import evidence
from badged.core.jose import b64url_decode
from badged.core.tpm_evidence import tpm_name
from badged.core.x509 import (
    RevokedSerial,
    agent_crl,
    csr_evidence,
    csr_uris,
    device_certificate,
    root_certificate,
    to_pem,
)
from badged.enroll import activation
from badged.enroll.device import REQUEST_FORMAT, device_spiffe_id
from badged.errors import ConfigError, InvalidRequestError, NotFoundError
from badged.fsutil import atomic_write, ensure_private_dir
from badged.identity.registry import check_agent_name
from badged.keystore.port import KeyHandle, KeyStore

_logger = logging.getLogger(__name__)

CA_KEY = "badged/ca/root"
MAX_REQUEST = 64 * 1024
CRL_DAYS = 7
# What the CA verified about a device key (the DEVICE_ATTESTATION_OID statement).
EVIDENCE_TPM_ACTIVATED = "tpm2-activated-ak"
"""TPM2_Certify by an AK that answered credential activation for an EK
certificate chained to a pinned manufacturer CA: the TPM's own word."""
EVIDENCE_TOKEN_STATEMENT = "token-statement"  # noqa: S105 - a label, not a secret
"""Key attributes as the token reports them, signed by the key itself: the
token's (and the host's) own statement, nothing a third party vouched for."""


class RequestRejected(InvalidRequestError):
    """An enrollment request the CA refuses; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}", public=f"enrollment request refused: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class CaFiles:
    directory: Path

    @property
    def root(self) -> Path:
        return self.directory / "root.pem"

    @property
    def hsm(self) -> Path:
        return self.directory / "hsm"

    @property
    def activations(self) -> Path:
        return self.directory / "activations"

    @property
    def devices(self) -> Path:
        """Index of issued device certificates (for revocation and the CRL)."""
        return self.directory / "devices.json"


@dataclass(frozen=True)
class CheckedRequest:
    """A request whose CSR and evidence verified; ``certify`` for TPM evidence."""

    csr: x509.CertificateSigningRequest
    trust_domain: str
    device_id: str
    claims: dict[str, Any]
    request_sha256: str
    ak_public: bytes | None
    ek_certificate: bytes | None

    @property
    def is_tpm(self) -> bool:
        return self.ak_public is not None


def attestation_statement(req: CheckedRequest, *, activated: bool) -> bytes:
    """Canonical JSON for the device certificate: what was verified, by name."""
    hw = req.claims.get("hwkey")
    backend = hw.get("backend") if isinstance(hw, dict) else None
    doc: dict[str, Any] = {"v": 1, "backend": str(backend or "unknown")}
    if activated and req.ak_public is not None:
        doc["evidence"] = EVIDENCE_TPM_ACTIVATED
        doc["ak_name"] = tpm_name(req.ak_public).hex()
        if req.ek_certificate is not None:
            doc["ek_certificate_sha256"] = hashlib.sha256(req.ek_certificate).hexdigest()
    else:
        doc["evidence"] = EVIDENCE_TOKEN_STATEMENT
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _open_store(files: CaFiles) -> KeyStore:
    """The CA's own SoftHSM token; SOFTHSM2_CONF must be set before the
    PKCS#11 module loads, so call this before any other token use in-process."""
    from badged.keystore.pkcs11.store import Pkcs11Config, Pkcs11KeyStore
    from badged.softhsm import provision

    token = provision(files.hsm, label="badged-ca")
    os.environ["SOFTHSM2_CONF"] = str(token.conf_path)
    return Pkcs11KeyStore.from_config(Pkcs11Config(uri=token.uri(), module_path=token.module_path))


class OperatorCA:
    def __init__(self, files: CaFiles, store: KeyStore, key: KeyHandle,
                 root: x509.Certificate) -> None:
        self._files = files
        self._store = store
        self._key = key
        self.root = root
        self._pending = activation.PendingActivations(files.activations)

    @classmethod
    def init(cls, directory: Path, *, name: str, days: int, now: float) -> OperatorCA:
        # Absolute: SoftHSM's config names the token directory, and a
        # relative one would resolve against whatever cwd opens it later.
        directory = directory.absolute()
        files = CaFiles(directory)
        if files.root.exists():
            raise ConfigError("a CA already exists here", path=str(directory))
        ensure_private_dir(directory)
        store = _open_store(files)
        key = store.generate(CA_KEY)
        root = root_certificate(key, name=name, now=now, days=days,
                                serial=x509.random_serial_number())
        atomic_write(files.root, to_pem(root).encode("ascii"), mode=0o644)
        _logger.info("operator CA created", extra={"ca_dir": str(directory)})
        return cls(files, store, key, root)

    @classmethod
    def open(cls, directory: Path) -> OperatorCA:
        directory = directory.absolute()
        files = CaFiles(directory)
        if not files.root.exists():
            raise ConfigError("no CA here (run badgectl ca init)", path=str(directory))
        store = _open_store(files)
        root = x509.load_pem_x509_certificate(files.root.read_bytes())
        return cls(files, store, store.get(CA_KEY), root)

    def close(self) -> None:
        self._store.close()

    def challenge(self, request: bytes, *, now: float,
                  trust_domains: frozenset[str] = frozenset(),
                  ek_ca_keys: Sequence[Any] | None = None) -> dict[str, Any]:
        """Verify a TPM request (all but the AK's origin) and challenge its AK.

        The challenge replaces any earlier one for the same request.
        """
        if ek_ca_keys is None:
            raise RequestRejected("ek_ca_required", "credential activation needs the TPM "
                                                    "manufacturer CA (--ek-ca)")
        req = verify_request(request, now=now, trust_domains=trust_domains, ek_ca_keys=ek_ca_keys,
                             for_challenge=True)
        if not req.is_tpm or req.ak_public is None:
            raise RequestRejected("evidence_not_tpm", "only TPM evidence has an AK to activate")
        try:
            doc, pending = activation.make_challenge(
                request_sha256=req.request_sha256, device_id=req.device_id,
                ak_public=req.ak_public, ek_certificate=req.ek_certificate, now=now)
        except activation.ActivationRejected as exc:
            raise RequestRejected(exc.reason, str(exc)) from None
        self._pending.put(pending)
        _logger.info("activation challenge issued", extra={"device": req.device_id,
                                                           "request": req.request_sha256})
        return doc

    def sign_request(self, request: bytes, *, days: int, now: float,
                     trust_domains: frozenset[str] = frozenset(),
                     ek_ca_keys: Sequence[Any] | None = None,
                     response: bytes | None = None,
                     agents: Sequence[str] | None = None) -> list[x509.Certificate]:
        """Check an enrollment request and issue the device chain [device, root].

        ``response``: the device's answer to :meth:`challenge` (TPM evidence
        is refused without it). ``agents``: the agents the device may vouch
        for (name constraints); None = any agent of its trust domain.
        """
        for agent in agents or ():
            check_agent_name(agent)
        if agents is not None and not agents:
            raise RequestRejected("no_agents", "name at least one agent the device may vouch for")
        activated: Collection[bytes] | None = None
        if response is not None:
            digest = _digest_of(request)
            try:
                activated = {activation.check_response(response, request_sha256=digest,
                                                       pending=self._pending.get(digest), now=now)}
            except activation.ActivationRejected as exc:
                raise RequestRejected(f"activation_{exc.reason}", str(exc)) from None
        req = verify_request(request, now=now, trust_domains=trust_domains, ek_ca_keys=ek_ca_keys,
                             activated_ak_names=activated)
        public = req.csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        cert = device_certificate(ca_key=self._key, ca_cert=self.root, device_public=public,
                                  device_id=req.device_id, trust_domain=req.trust_domain, now=now,
                                  days=days, serial=x509.random_serial_number(), agents=agents,
                                  attestation=attestation_statement(req,
                                                                    activated=activated is not None))
        if activated is not None:
            self._pending.consume(req.request_sha256)
        self._record(cert, req.device_id)
        _logger.info("device certificate issued", extra={"device": req.device_id,
                                                         "serial": f"{cert.serial_number:x}"})
        return [cert, self.root]

    # -- issued device certificates, revocation ---------------------------------------------

    def _devices(self) -> list[dict[str, Any]]:
        try:
            raw = json.loads(self._files.devices.read_bytes())
        except FileNotFoundError:
            return []
        except ValueError:
            raise ConfigError("device index is unreadable", path=str(self._files.devices)) from None
        return [r for r in raw if isinstance(r, dict)] if isinstance(raw, list) else []

    def _save_devices(self, rows: list[dict[str, Any]]) -> None:
        atomic_write(self._files.devices, json.dumps(rows, indent=1).encode())

    def _record(self, cert: x509.Certificate, dev_id: str) -> None:
        rows = self._devices()
        rows.append({"serial": f"{cert.serial_number:x}", "device_id": dev_id,
                     "not_after": int(cert.not_valid_after_utc.timestamp()), "revoked_at": None})
        self._save_devices(rows)

    def revoke(self, *, now: float, serial: int | None = None,
               device_id: str | None = None) -> list[int]:
        """Revoke a device certificate by serial, or every one of a device.

        The device's agent certificates chain through it, so a relying party
        that checks the CA's CRL (``openssl verify -crl_check_all``,
        badgeclient's Revocations) refuses them all with it.
        """
        rows = self._devices()
        hit = [r for r in rows if (serial is not None and r.get("serial") == f"{serial:x}")
               or (device_id is not None and r.get("device_id") == device_id)]
        if not hit:
            raise NotFoundError("no such device certificate issued by this CA")
        for r in hit:
            r["revoked_at"] = r.get("revoked_at") or int(now)
        self._save_devices(rows)
        return [int(r["serial"], 16) for r in hit]

    def crl(self, *, now: float, number: int | None = None) -> x509.CertificateRevocationList:
        """The CA's CRL over revoked, unexpired device certificates."""
        revoked = [RevokedSerial(int(r["serial"], 16), int(r["revoked_at"]),
                                 x509.ReasonFlags.key_compromise)
                   for r in self._devices() if r.get("revoked_at") and r["not_after"] > now]
        return agent_crl(device_key=self._key, device_cert=self.root, revoked=revoked, now=now,
                         next_update_seconds=CRL_DAYS * 86400,
                         number=number if number is not None else int(now))


def _digest_of(request: bytes) -> str:
    """The request digest of a file, or the reason it has none."""
    doc = _load_request(request)
    return activation.request_digest(_load_csr(doc))


def _load_request(request: bytes) -> dict[str, Any]:
    if len(request) > MAX_REQUEST:
        raise RequestRejected("oversized", "request file too large")
    try:
        doc = json.loads(request)
    except ValueError:
        raise RequestRejected("malformed", "request is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != REQUEST_FORMAT:
        raise RequestRejected("malformed", f"not a {REQUEST_FORMAT} file")
    return doc


def _load_csr(doc: dict[str, Any]) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(str(doc.get("csr", "")).encode("ascii", "replace"))
        _ = csr.extensions  # parsed lazily by cryptography: fail here, not later
    except ValueError:
        raise RequestRejected("malformed", "csr is not a PEM CSR") from None
    return csr


def check_request(request: bytes, *, now: float, trust_domains: frozenset[str] = frozenset(),
                  ek_ca_keys: Sequence[Any] | None = None,
                  activated_ak_names: Collection[bytes] | None = None
                  ) -> tuple[x509.CertificateSigningRequest, str, str]:
    """Everything the CA verifies before signing; RequestRejected with a reason.

    ``ek_ca_keys``: TPM manufacturer CA keys; when given, only TPM evidence
    (TPM2_Certify) whose EK certificate chains to one of them is accepted.
    ``activated_ak_names``: AK Names that completed credential activation for
    this request; TPM evidence by any other AK (or with none) is refused.
    """
    req = verify_request(request, now=now, trust_domains=trust_domains, ek_ca_keys=ek_ca_keys,
                         activated_ak_names=activated_ak_names)
    return req.csr, req.trust_domain, req.device_id


def verify_request(request: bytes, *, now: float, trust_domains: frozenset[str] = frozenset(),
                   ek_ca_keys: Sequence[Any] | None = None,
                   activated_ak_names: Collection[bytes] | None = None,
                   for_challenge: bool = False) -> CheckedRequest:
    """:func:`check_request`, keeping what the challenge and the certificate need.

    ``activated_ak_names=None`` with TPM evidence: every check but the AK's
    origin runs, then ``activation_required`` -- unless ``for_challenge``
    (:meth:`OperatorCA.challenge`, which is how the AK gets activated).
    """
    from badged.core.jose import ec_public_jwk, jwk_thumbprint

    doc = _load_request(request)
    csr = _load_csr(doc)
    if not csr.is_signature_valid:
        raise RequestRejected("bad_csr_signature", "CSR is not signed by the key it names")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve,
                                                                           ec.SECP256R1):
        raise RequestRejected("bad_key", "device key must be EC P-256")
    ev = csr_evidence(csr)
    if ev is None:
        raise RequestRejected("no_evidence", "CSR carries no attestation evidence")
    try:
        claims = evidence.check_evidence(ev.decode("ascii"), signer=public, attested=public, now=now,
                                         ek_ca_keys=ek_ca_keys, trusted_ak_names=activated_ak_names)
    except (evidence.EvidenceError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "reason", "malformed")
        raise RequestRejected(f"evidence_{reason}", str(exc)) from None
    is_tpm = claims.get("eat_profile") == evidence.TPM2_CERTIFY_PROFILE
    if ek_ca_keys is not None and not is_tpm:
        raise RequestRejected("evidence_not_tpm", "this CA requires TPM2_Certify evidence")
    dev_id = jwk_thumbprint(ec_public_jwk(public))
    uris = csr_uris(csr)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise RequestRejected("wrong_identity", "CSR must name exactly one SPIFFE ID")
    trust_domain = uris[0][len("spiffe://"):].split("/", 1)[0]
    if uris[0] != device_spiffe_id(trust_domain, dev_id):
        raise RequestRejected("wrong_identity", "SPIFFE ID does not match the device key")
    if trust_domains and trust_domain not in trust_domains:
        raise RequestRejected("trust_domain", "trust domain not allowed by this CA")
    if claims.get("sub") != uris[0]:
        raise RequestRejected("evidence_key_mismatch", "evidence is about another identity")
    ak_public = ek_cert = None
    if is_tpm:
        # TPM evidence is only worth its profile when the EK is pinned and the
        # AK proved it lives with that EK; otherwise refuse rather than issue a
        # certificate that looks hardware-attested.
        if ek_ca_keys is None:
            raise RequestRejected("ek_ca_required", "TPM evidence is checked against the TPM "
                                                    "manufacturer CA: pass --ek-ca")
        raw = claims["tpm2_certify"]  # shape checked by check_evidence
        ak_public = b64url_decode(raw["ak_public"])
        ek_cert = b64url_decode(raw["ek_certificate"]) if raw.get("ek_certificate") else None
    checked = CheckedRequest(csr=csr, trust_domain=trust_domain, device_id=dev_id, claims=claims,
                             request_sha256=activation.request_digest(csr), ak_public=ak_public,
                             ek_certificate=ek_cert)
    if is_tpm and activated_ak_names is None and not for_challenge:
        raise RequestRejected("activation_required",
                              "TPM evidence is accepted only after credential activation: "
                              "badgectl ca challenge, badgectl enroll activate, then "
                              "badgectl ca sign --response")
    return checked
