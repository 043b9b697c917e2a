"""X.509 for badged: device and agent certificates, CSRs and the agent CRL.

Pure construction, no I/O: keys are :class:`~badged.keystore.port.KeyHandle`
objects (the private half stays in the token) and ``now`` is an argument, so
every validity rule is tested with a table.

The chain a relying party sees is::

    operator root CA  (badgectl ca init; key in its own token)
      └─ device certificate   CA:TRUE, pathlen 0, issues for its trust domain,
         │                    SAN = spiffe://TD/device/ID; key = the device key;
         │                    name constraints: the agents it was enrolled for;
         │                    the CA's attestation statement
         └─ agent certificate CA:FALSE, subject O=badged agent, CN=<agent>,
                              SAN URI = the agent's SPIFFE ID,
                              minutes-to-hours validity; key = the agent's
                              token key

so a relying party that trusts only the organization's root can verify any
agent on any enrolled device (``openssl verify -CAfile root.pem -untrusted
device.pem agent.pem``), and the device can issue for nothing outside its
trust domain and the agents its certificate names.

``cryptography``'s builders sign with any ``EllipticCurvePrivateKey``; the
:class:`HandlePrivateKey` adapter below makes a token key look like one
(STYLE §5a), so the same code signs with SoftHSM, a TPM or a test key.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from badged.keystore.port import KeyHandle

_logger = logging.getLogger(__name__)

# A UUID-derived OID (ITU-T X.667, arc 2.25) so we need no registered PEN:
# the CSR extension that carries badged's key-attestation evidence (a JWS
# signed by the device key, see badged.core.evidence).
EVIDENCE_OID = x509.ObjectIdentifier("2.25.223010867497063926016584361466012431651")
# Device-certificate extension: what the CA verified about the device key
# before signing (canonical JSON, see badged.enroll.ca.attestation_statement),
# e.g. a TPM whose AK was activated against its EK, and that AK's Name.
DEVICE_ATTESTATION_OID = x509.ObjectIdentifier("2.25.54195680950305630700219462399422570192")
AGENT_ORG = "badged agent"
# Agent certificates are backdated a little so a relying party whose clock
# is slightly behind does not see a not-yet-valid certificate.
BACKDATE_SECONDS = 60
MAX_AGENT_CERT_TTL = 24 * 3600


class HandlePrivateKey(ec.EllipticCurvePrivateKey):
    """An ``EllipticCurvePrivateKey`` whose ``sign`` runs in the token.

    Only what a builder needs is implemented; everything that would expose
    private material raises ``NotImplementedError`` because the material is
    not here (as ``tpm2_pytss.cryptography`` does for TPM keys).
    """

    def __init__(self, handle: KeyHandle) -> None:
        self._handle = handle
        self._public = handle.public_key()

    @property
    def handle(self) -> KeyHandle:
        return self._handle

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise NotImplementedError("only ECDSA signatures are supported")
        if isinstance(signature_algorithm.algorithm, Prehashed):
            raise NotImplementedError("prehashed signing is not supported by every backend")
        return self._handle.sign(bytes(data), signature_algorithm)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise NotImplementedError("key agreement is not offered by token keys")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise NotImplementedError("the private key never leaves the token")

    def private_bytes(self, encoding: serialization.Encoding, format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        raise NotImplementedError("the private key never leaves the token")

    def __copy__(self) -> HandlePrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> HandlePrivateKey:
        return self


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(epoch), dt.UTC)


def spiffe_trust_domain(spiffe_id: str) -> str:
    """``spiffe://td/path`` → ``td``; ValueError if it is not a SPIFFE ID."""
    if not spiffe_id.startswith("spiffe://"):
        raise ValueError("not a SPIFFE ID")
    td = spiffe_id[len("spiffe://"):].split("/", 1)[0]
    if not td:
        raise ValueError("SPIFFE ID without trust domain")
    return td


def build_csr(key: KeyHandle, *, common_name: str, uris: Sequence[str] = (),
              evidence: bytes | None = None) -> x509.CertificateSigningRequest:
    """PKCS#10 CSR signed by ``key`` (proof of possession), evidence attached.

    The evidence travels as a non-critical requested extension so a CA that
    does not know it still processes the CSR, and is covered by the CSR
    signature so it cannot be swapped for another key's evidence in transit.
    """
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False)
    if evidence is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(EVIDENCE_OID, evidence),
                                        critical=False)
    return builder.sign(HandlePrivateKey(key), hashes.SHA256())


def csr_evidence(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The evidence extension of a CSR, if any."""
    try:
        ext = csr.extensions.get_extension_for_oid(EVIDENCE_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        return None
    return value.value


def csr_uris(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _ski(public: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        pub = issuer.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(pub)


def root_certificate(key: KeyHandle, *, name: str, now: float, days: int,
                     serial: int) -> x509.Certificate:
    """Self-signed operator root: CA, may issue device CAs (pathlen 1)."""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "badged operator CA"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(_utc(now - BACKDATE_SECONDS))
        .not_valid_after(_utc(now + days * 86400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(_ski(public), critical=False)
        .sign(HandlePrivateKey(key), hashes.SHA256())
    )


def agent_subject(agent: str) -> x509.Name:
    """The subject of an agent certificate; also the name-constraint base
    (one encoding for both, so openssl's prefix match is exact)."""
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, AGENT_ORG),
                      x509.NameAttribute(NameOID.COMMON_NAME, agent)])


def agent_name_constraints(agents: Sequence[str]) -> x509.NameConstraints:
    """Permit exactly these agents' subjects below a device certificate."""
    if not agents:
        raise ValueError("a constrained device certificate names at least one agent")
    return x509.NameConstraints(
        permitted_subtrees=[x509.DirectoryName(agent_subject(a)) for a in sorted(set(agents))],
        excluded_subtrees=None)


def permitted_agents(device_cert: x509.Certificate) -> frozenset[str] | None:
    """The agent names a device certificate may vouch for; None = unconstrained.

    A name-constraints extension that is not of badged's shape permits
    nothing here (fail closed): only ``O=badged agent, CN=<name>`` bases count.
    """
    try:
        nc = device_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    out: set[str] = set()
    for sub in nc.permitted_subtrees or ():
        if not isinstance(sub, x509.DirectoryName):
            continue
        rdns = list(sub.value.rdns)
        if len(rdns) != 2 or len(rdns[0]) != 1 or len(rdns[1]) != 1:
            continue
        o, cn = next(iter(rdns[0])), next(iter(rdns[1]))
        if o.oid == NameOID.ORGANIZATION_NAME and o.value == AGENT_ORG \
                and cn.oid == NameOID.COMMON_NAME and isinstance(cn.value, str):
            out.add(cn.value)
    return frozenset(out)


def device_attestation(device_cert: x509.Certificate) -> bytes | None:
    """The CA's attestation statement in a device certificate, if any."""
    try:
        ext = device_cert.extensions.get_extension_for_oid(DEVICE_ATTESTATION_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def device_certificate(*, ca_key: KeyHandle, ca_cert: x509.Certificate,
                       device_public: ec.EllipticCurvePublicKey, device_id: str,
                       trust_domain: str, now: float, days: int, serial: int,
                       agents: Sequence[str] | None = None,
                       attestation: bytes | None = None) -> x509.Certificate:
    """The device's CA certificate, issued by the operator CA.

    ``pathlen 0``: the device issues agent leaves only. Its SAN names the
    trust domain it serves. There is no URI name constraint: openssl matches
    URI constraints on the host only (the trust domain, not the agent path)
    and common path validators (cryptography's, rustls-webpki) reject chains
    carrying one. ``agents``: the agents this device may vouch for, as
    directoryName constraints on the agent subject (``O=badged agent,
    CN=<name>``), which openssl enforces; *non-critical*, because
    cryptography's validator refuses a critical directoryName constraint --
    badgeclient.verify checks the same rule itself (RFC 5280 asks for
    critical; the trade-off is in docs/credentials.md). ``attestation``: what
    the CA verified about the device key (DEVICE_ATTESTATION_OID).
    """
    not_after = min(now + days * 86400, ca_cert.not_valid_after_utc.timestamp())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "badged device"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(device_public)
        .serial_number(serial)
        .not_valid_before(_utc(now - BACKDATE_SECONDS))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}/device/{device_id}")]),
            critical=False)
        .add_extension(_ski(device_public), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if agents is not None:
        builder = builder.add_extension(agent_name_constraints(agents), critical=False)
    if attestation is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(DEVICE_ATTESTATION_OID,
                                                                   attestation), critical=False)
    return builder.sign(HandlePrivateKey(ca_key), hashes.SHA256())


@dataclass(frozen=True)
class AgentCertRequest:
    spiffe_id: str
    agent: str
    public_key: ec.EllipticCurvePublicKey
    serial: int
    ttl_seconds: int


def agent_certificate(*, device_key: KeyHandle, device_cert: x509.Certificate,
                      request: AgentCertRequest, now: float) -> x509.Certificate:
    """An X509-SVID-shaped leaf for an agent key, issued by the device key.

    Never outlives the device certificate: a chain whose middle expires
    first would be refused by every verifier anyway.
    """
    if not 0 < request.ttl_seconds <= MAX_AGENT_CERT_TTL:
        raise ValueError(f"agent certificate ttl must be 1..{MAX_AGENT_CERT_TTL}s")
    device_end = device_cert.not_valid_after_utc.timestamp()
    if device_end <= now:
        raise ValueError("device certificate has expired")
    not_after = min(now + request.ttl_seconds, device_end)
    return (
        x509.CertificateBuilder()
        .subject_name(agent_subject(request.agent))
        .issuer_name(device_cert.subject)
        .public_key(request.public_key)
        .serial_number(request.serial)
        .not_valid_before(_utc(max(now - BACKDATE_SECONDS,
                                   device_cert.not_valid_before_utc.timestamp())))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                              ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(request.spiffe_id)]), critical=False)
        .add_extension(_ski(request.public_key), critical=False)
        .add_extension(_aki(device_cert), critical=False)
        .sign(HandlePrivateKey(device_key), hashes.SHA256())
    )


@dataclass(frozen=True)
class RevokedSerial:
    serial: int
    revoked_at: int
    reason: x509.ReasonFlags


def agent_crl(*, device_key: KeyHandle, device_cert: x509.Certificate,
              revoked: Sequence[RevokedSerial], now: float, next_update_seconds: int,
              number: int) -> x509.CertificateRevocationList:
    """CRL of agent certificates, signed by the device key (the issuer)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(device_cert.subject)
        .last_update(_utc(now - BACKDATE_SECONDS))
        .next_update(_utc(now + next_update_seconds))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(device_cert), critical=False)
    )
    for r in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(r.serial)
            .revocation_date(_utc(r.revoked_at))
            .add_extension(x509.CRLReason(r.reason), critical=False)
            .build())
    return builder.sign(HandlePrivateKey(device_key), hashes.SHA256())


def to_pem(obj: x509.Certificate | x509.CertificateSigningRequest
           | x509.CertificateRevocationList) -> str:
    return obj.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, leaf first; ValueError if none."""
    certs = x509.load_pem_x509_certificates(data)
    if not certs:
        raise ValueError("no certificate in PEM data")
    return certs


def same_public_key(a: ec.EllipticCurvePublicKey, b: Any) -> bool:
    """True when ``b`` is the same EC public key as ``a`` (by SPKI bytes)."""
    if not isinstance(b, ec.EllipticCurvePublicKey):
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)
