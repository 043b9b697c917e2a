"""A small operator CA for labs and tests (``badgectl ca init|sign``).

Its key lives in a token too (a SoftHSM token of its own under the CA
directory), and it signs nothing before it has checked the request:

1. the CSR is signed by the key it names (possession of the device key);
2. the evidence embedded in the CSR is signed by that same key and attests
   *that* key (not another one) as sensitive, never extractable and
   generated in the token;
3. the CSR names ``spiffe://TD/device/<thumbprint of its key>`` in an
   allowed trust domain.

Production uses the organization's CA with the same files: the request is a
standard PKCS#10 CSR plus a JSON wrapper, and the evidence check is
:func:`badged.core.evidence.check_evidence`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from badged.core import evidence
from badged.core.x509 import csr_evidence, csr_uris, device_certificate, root_certificate, to_pem
from badged.enroll.device import REQUEST_FORMAT, device_spiffe_id
from badged.errors import ConfigError, InvalidRequestError
from badged.fsutil import atomic_write, ensure_private_dir
from badged.keystore.port import KeyHandle, KeyStore

_logger = logging.getLogger(__name__)

CA_KEY = "badged/ca/root"
MAX_REQUEST = 64 * 1024


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

    @classmethod
    def init(cls, directory: Path, *, name: str, days: int, now: float) -> OperatorCA:
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
        files = CaFiles(directory)
        if not files.root.exists():
            raise ConfigError("no CA here (run badgectl ca init)", path=str(directory))
        store = _open_store(files)
        root = x509.load_pem_x509_certificate(files.root.read_bytes())
        return cls(files, store, store.get(CA_KEY), root)

    def close(self) -> None:
        self._store.close()

    def sign_request(self, request: bytes, *, days: int, now: float,
                     trust_domains: frozenset[str] = frozenset(),
                     ek_ca_keys: Sequence[Any] | None = None) -> list[x509.Certificate]:
        """Check an enrollment request and issue the device chain [device, root]."""
        csr, trust_domain, dev_id = check_request(request, now=now, trust_domains=trust_domains,
                                                  ek_ca_keys=ek_ca_keys)
        public = csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        cert = device_certificate(ca_key=self._key, ca_cert=self.root, device_public=public,
                                  device_id=dev_id, trust_domain=trust_domain, now=now, days=days,
                                  serial=x509.random_serial_number())
        _logger.info("device certificate issued", extra={"device": dev_id,
                                                         "serial": f"{cert.serial_number:x}"})
        return [cert, self.root]


def check_request(request: bytes, *, now: float, trust_domains: frozenset[str] = frozenset(),
                  ek_ca_keys: Sequence[Any] | None = None
                  ) -> tuple[x509.CertificateSigningRequest, str, str]:
    """Everything the CA verifies before signing; RequestRejected with a reason.

    ``ek_ca_keys``: TPM manufacturer CA keys; when given, only TPM evidence
    (TPM2_Certify) whose EK certificate chains to one of them is accepted.
    """
    from badged.core.jose import ec_public_jwk, jwk_thumbprint

    if len(request) > MAX_REQUEST:
        raise RequestRejected("oversized", "request file too large")
    try:
        doc = json.loads(request)
    except ValueError:
        raise RequestRejected("malformed", "request is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != REQUEST_FORMAT:
        raise RequestRejected("malformed", f"not a {REQUEST_FORMAT} file")
    try:
        csr = x509.load_pem_x509_csr(str(doc.get("csr", "")).encode("ascii", "replace"))
        _ = csr.extensions  # parsed lazily by cryptography: fail here, not later
    except ValueError:
        raise RequestRejected("malformed", "csr is not a PEM CSR") from None
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
                                         ek_ca_keys=ek_ca_keys)
    except (evidence.EvidenceError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "reason", "malformed")
        raise RequestRejected(f"evidence_{reason}", str(exc)) from None
    if ek_ca_keys is not None and claims.get("eat_profile") != evidence.TPM2_CERTIFY_PROFILE:
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
    return csr, trust_domain, dev_id

