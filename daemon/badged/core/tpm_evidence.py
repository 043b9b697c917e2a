"""Verify TPM2_Certify key attestations with ``cryptography`` alone.

Pure: no TPM, no TSS, no I/O. A relying party (or a test) checks here what a
:class:`~badged.keystore.attest.KeyAttestation` claims, written from the TCG
TPM 2.0 Library spec, Part 2 (structures), not from the TSS that produced it,
so a bug on the producing side cannot hide behind the same code:

* ``attest`` is a TPMS_ATTEST: magic ``TPM_GENERATED_VALUE`` (0xff544347; a
  restricted key refuses to sign anything starting with it that the TPM did
  not make itself), type ``TPM_ST_ATTEST_CERTIFY`` (0x8017), ``extraData`` =
  the verifier's nonce, and the certified Name = nameAlg || H(public area);
* the certified public area has the attributes that make a key
  non-exportable and TPM-generated (fixedTPM, fixedParent,
  sensitiveDataOrigin), can sign and cannot decrypt;
* the AK is a restricted signing key and its ECDSA signature over ``attest``
  verifies; optionally its Name is one the verifier enrolled;
* optionally the EK certificate chains to a pinned CA *key* (swtpm's local CA
  names are the same on every install, so names prove nothing).

What ties the AK to the EK is credential activation: :func:`make_credential`
here, ``TpmKeyStore.activate_credential`` on the TPM. A verifier that
activated an AK pins its Name and passes it as ``trusted_ak_names``; without
that the EK certificate only says that *some* genuine TPM exists.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from badged.errors import AttestationError
from badged.keystore.attest import FORMAT_TPM2_CERTIFY, KeyAttestation

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_CERTIFY = 0x8017
TPM_ST_ATTEST_QUOTE = 0x8018

ALG_RSA = 0x0001
ALG_AES = 0x0006
ALG_SHA256 = 0x000B
ALG_NULL = 0x0010
ALG_ECDSA = 0x0018
ALG_ECDAA = 0x001A
ALG_ECC = 0x0023
ALG_CFB = 0x0043
ECC_NIST_P256 = 0x0003

# TPMA_OBJECT (Part 2, 8.3.2)
FIXED_TPM = 0x00000002
FIXED_PARENT = 0x00000010
SENSITIVE_DATA_ORIGIN = 0x00000020
USER_WITH_AUTH = 0x00000040
RESTRICTED = 0x00010000
DECRYPT = 0x00020000
SIGN = 0x00040000

_CURVES: dict[int, ec.EllipticCurve] = {ECC_NIST_P256: ec.SECP256R1()}


def _fail(reason: str) -> AttestationError:
    return AttestationError(f"TPM key attestation rejected: {reason}")


class _Reader:
    """Big-endian cursor over TPM marshaled bytes; any overrun is an AttestationError."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise _fail(f"{self._what} is truncated")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _fail(f"{self._what} has {len(self._data) - self._pos} trailing bytes")


@dataclass(frozen=True)
class TpmPublic:
    """The parts of a TPMT_PUBLIC (ECC) that the checks need."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    scheme: int
    scheme_hash: int
    curve: int
    public_key: ec.EllipticCurvePublicKey

    @property
    def name(self) -> bytes:
        return tpm_name(self.raw)


@dataclass(frozen=True)
class CertifyInfo:
    """A parsed TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    certified_name: bytes
    certified_qualified_name: bytes


@dataclass(frozen=True)
class VerifiedKey:
    """What a successful verification established."""

    public_key: ec.EllipticCurvePublicKey
    key_tpm_name: bytes
    ak_name: bytes
    attributes: int
    ek_certificate: x509.Certificate | None
    firmware_version: int
    reset_count: int


def tpm_name(public_area: bytes) -> bytes:
    """Name of an object with nameAlg SHA-256: 0x000b || SHA-256(TPMT_PUBLIC)."""
    return struct.pack(">H", ALG_SHA256) + hashlib.sha256(public_area).digest()


def parse_public(data: bytes, what: str = "public area") -> TpmPublic:
    """Parse a marshaled TPMT_PUBLIC of an ECC key (the only kind badged makes)."""
    r = _Reader(data, what)
    typ, name_alg, attrs = r.u16(), r.u16(), r.u32()
    policy = r.tpm2b()
    if typ != ALG_ECC:
        raise _fail(f"{what} is not an ECC key (type 0x{typ:04x})")
    if name_alg != ALG_SHA256:
        raise _fail(f"{what} nameAlg 0x{name_alg:04x} is not SHA-256")
    sym = r.u16()
    if sym != ALG_NULL:
        r.u16()  # keyBits
        r.u16()  # mode
    scheme = r.u16()
    scheme_hash = 0
    if scheme != ALG_NULL:
        scheme_hash = r.u16()
        if scheme == ALG_ECDAA:
            r.u16()  # count
    curve = r.u16()
    kdf = r.u16()
    if kdf != ALG_NULL:
        r.u16()
    x, y = r.tpm2b(), r.tpm2b()
    r.end()
    ec_curve = _CURVES.get(curve)
    if ec_curve is None:
        raise _fail(f"{what} uses unsupported curve 0x{curve:04x}")
    size = (ec_curve.key_size + 7) // 8
    if len(x) > size or len(y) > size:
        raise _fail(f"{what} has an oversized point")
    try:
        point = b"\x04" + x.rjust(size, b"\0") + y.rjust(size, b"\0")
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec_curve, point)
    except ValueError:
        raise _fail(f"{what} holds a point that is not on the curve") from None
    return TpmPublic(raw=bytes(data), type=typ, name_alg=name_alg, attributes=attrs, auth_policy=policy,
                     scheme=scheme, scheme_hash=scheme_hash, curve=curve, public_key=key)


def parse_certify_info(data: bytes) -> CertifyInfo:
    """Parse a TPMS_ATTEST and insist it is a TPM-generated TPM2_Certify result."""
    r = _Reader(data, "TPMS_ATTEST")
    magic = r.u32()
    if magic != TPM_GENERATED_VALUE:
        raise _fail(f"not a TPM-generated structure (magic 0x{magic:08x})")
    typ = r.u16()
    if typ != TPM_ST_ATTEST_CERTIFY:
        raise _fail(f"not a TPM2_Certify attestation (type 0x{typ:04x})")
    signer, extra = r.tpm2b(), r.tpm2b()
    clock, resets, restarts, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    name, qname = r.tpm2b(), r.tpm2b()
    r.end()
    return CertifyInfo(magic=magic, type=typ, qualified_signer=signer, extra_data=extra, clock=clock,
                       reset_count=resets, restart_count=restarts, safe=bool(safe),
                       firmware_version=firmware, certified_name=name, certified_qualified_name=qname)


def check_agent_key_attributes(attrs: int) -> None:
    """The attributes that make a key TPM-bound and sign-only, each with its reason."""
    if not attrs & FIXED_TPM:
        raise _fail("key is not fixedTPM: it can be duplicated out of the TPM")
    if not attrs & FIXED_PARENT:
        raise _fail("key is not fixedParent: it can be moved to another parent")
    if not attrs & SENSITIVE_DATA_ORIGIN:
        raise _fail("key is not sensitiveDataOrigin: it was imported, not generated in the TPM")
    if not attrs & SIGN:
        raise _fail("key cannot sign")
    if attrs & DECRYPT:
        raise _fail("key can also decrypt")
    if attrs & RESTRICTED:
        raise _fail("key is restricted: it cannot sign credentials")


def _check_ak(ak: TpmPublic) -> None:
    need = RESTRICTED | SIGN | FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN
    if ak.attributes & need != need or ak.attributes & DECRYPT:
        raise _fail(f"AK attributes 0x{ak.attributes:08x} are not those of a restricted, "
                    "TPM-generated signing key")
    if ak.scheme not in (ALG_ECDSA, ALG_NULL) or ak.scheme_hash not in (ALG_SHA256, 0):
        raise _fail("AK scheme is not ECDSA-SHA256")


def verify_certify(
    evidence: KeyAttestation,
    nonce: bytes,
    *,
    trusted_ak_names: Collection[bytes] | None = None,
    expected_public_key: ec.EllipticCurvePublicKey | None = None,
    ek_ca_keys: Sequence[rsa.RSAPublicKey | ec.EllipticCurvePublicKey] | None = None,
    ek_intermediates: Sequence[x509.Certificate] = (),
) -> VerifiedKey:
    """Check ``evidence`` against the verifier's own ``nonce``; raise AttestationError.

    ``nonce`` is the value *this verifier* issued for this request, never the
    copy inside ``evidence``. ``trusted_ak_names``: AK Names enrolled by
    credential activation (None = any restricted AK; then the evidence proves
    "some TPM", see the module docstring). ``ek_ca_keys``: pinned CA public
    keys the EK certificate must chain to (via ``ek_intermediates``).
    """
    if evidence.format != FORMAT_TPM2_CERTIFY:
        raise _fail(f"unsupported evidence format {evidence.format!r}")
    if len(nonce) < 8:
        raise _fail("the verifier's nonce is too short to prevent replay")
    ak = parse_public(evidence.ak_public, "AK public area")
    _check_ak(ak)
    if trusted_ak_names is not None and ak.name not in trusted_ak_names:
        raise _fail("signed by an AK that was not enrolled (no credential activation for it)")
    try:
        ak.public_key.verify(evidence.signature, evidence.attest, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _fail("bad AK signature over TPMS_ATTEST (tampered, or signed by another AK)") from None
    info = parse_certify_info(evidence.attest)
    if not hmac.compare_digest(info.extra_data, nonce):
        raise _fail("nonce mismatch: stale or replayed evidence")
    key = parse_public(evidence.key_public, "key public area")
    if not hmac.compare_digest(info.certified_name, key.name):
        raise _fail("the TPM certified another key than the public area presented")
    check_agent_key_attributes(key.attributes)
    expected = expected_public_key
    if expected is not None and expected.public_numbers() != key.public_key.public_numbers():
        raise _fail("the attested key is not the key in question")
    ek_cert = None
    if evidence.ek_certificate is not None:
        try:
            ek_cert = x509.load_der_x509_certificate(evidence.ek_certificate)
        except ValueError:
            raise _fail("EK certificate is not valid DER") from None
    if ek_ca_keys is not None:
        if ek_cert is None:
            raise _fail("no EK certificate: cannot chain the TPM to its manufacturer")
        verify_ek_chain(ek_cert, ek_intermediates, ek_ca_keys)
    return VerifiedKey(public_key=key.public_key, key_tpm_name=key.name, ak_name=ak.name,
                       attributes=key.attributes, ek_certificate=ek_cert,
                       firmware_version=info.firmware_version, reset_count=info.reset_count)


def _signed_by(cert: x509.Certificate, key: object) -> bool:
    params = cert.signature_algorithm_parameters
    try:
        if isinstance(key, rsa.RSAPublicKey) and isinstance(params, padding.PKCS1v15 | padding.PSS):
            algo = cert.signature_hash_algorithm
            if algo is None:
                return False
            key.verify(cert.signature, cert.tbs_certificate_bytes, params, algo)
            return True
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA):
            key.verify(cert.signature, cert.tbs_certificate_bytes, params)
            return True
    except InvalidSignature:
        return False
    return False


def verify_ek_chain(ek_cert: x509.Certificate, intermediates: Sequence[x509.Certificate],
                    ca_keys: Sequence[rsa.RSAPublicKey | ec.EllipticCurvePublicKey]) -> None:
    """Walk issuer links from the EK certificate until a pinned CA key signed one.

    Signatures only: EK certificates are long-lived device identities whose
    validity dates are often wrong or absent, and this module does no I/O
    (no clock, no CRL); a verifier with policy on those adds it around this.
    """
    cur = ek_cert
    for _ in range(len(intermediates) + 1):
        if any(_signed_by(cur, k) for k in ca_keys):
            return
        nxt = next((c for c in intermediates if c.subject == cur.issuer and _signed_by(cur, c.public_key())),
                   None)
        if nxt is None:
            break
        cur = nxt
    raise _fail("EK certificate does not chain to a pinned CA key")


# -- credential activation (the verifier's half) ---------------------------------------


@dataclass(frozen=True)
class CredentialChallenge:
    """MakeCredential output: send blob + encrypted secret, keep ``secret``."""

    secret: bytes
    credential_blob: bytes  # TPM2B_ID_OBJECT, marshaled
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET, marshaled


def _kdfa(key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    """TPM KDFa (Part 1, 11.4.10.2): SP 800-108 counter mode, HMAC-SHA256."""
    return KBKDFHMAC(algorithm=hashes.SHA256(), mode=Mode.CounterMode, length=bits // 8, rlen=4, llen=4,
                     location=CounterLocation.BeforeFixed, label=label, context=context,
                     fixed=None).derive(key)


def _aes_cfb_encrypt(key: bytes, data: bytes) -> bytes:
    """AES-CFB128 with a zero IV (what the TPM uses for credential blobs).

    Built on AES-ECB because ``cryptography`` is moving CFB to its "decrepit"
    module; CFB is one block encryption XORed per 16 bytes.
    """
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - single-block primitive for CFB
    out = bytearray()
    feedback = b"\0" * 16
    for i in range(0, len(data), 16):
        block = data[i:i + 16]
        stream = ecb.update(feedback)
        ct = bytes(a ^ b for a, b in zip(block, stream, strict=False))
        out += ct
        feedback = ct
    return bytes(out)


def _kdfe(z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """TPM KDFe (Part 1, 11.4.10.3): SP 800-56A concatenation KDF, SHA-256:
    H(counter || Z || label-with-NUL || PartyUInfo || PartyVInfo), counter from 1."""
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        out += hashlib.sha256(struct.pack(">I", counter) + z + label + party_u + party_v).digest()
        counter += 1
    return out[:bits // 8]


def _ecc_seed(ek: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes]:
    """Seed and TPM2B_ENCRYPTED_SECRET content for an ECC EK: one-pass ECDH
    with an ephemeral key, then KDFe(Z, "IDENTITY", ephemeral.x, EK.x)."""
    size = (ek.curve.key_size + 7) // 8
    ephemeral = ec.generate_private_key(ek.curve)
    z = ephemeral.exchange(ec.ECDH(), ek)  # the x coordinate of the shared point
    eph = ephemeral.public_key().public_numbers()
    ex, ey = eph.x.to_bytes(size, "big"), eph.y.to_bytes(size, "big")
    ek_x = ek.public_numbers().x.to_bytes(size, "big")
    seed = _kdfe(z, b"IDENTITY\x00", ex, ek_x, 256)
    point = struct.pack(">H", size) + ex + struct.pack(">H", size) + ey  # TPMS_ECC_POINT
    return seed, point


def make_credential(ek_public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, ak_name: bytes,
                    secret: bytes | None = None) -> CredentialChallenge:
    """TPM2_MakeCredential in software, for an EK of the TCG default templates
    with SHA-256 and AES-128-CFB: RSA-2048 (L-1: the seed is RSA-OAEP-SHA256
    encrypted with label "IDENTITY\\0") or ECC P-256 (L-2: ECDH + KDFe). Only
    the TPM holding that EK can recover ``secret``, and only into the object
    whose Name is ``ak_name``."""
    rsa_ek = isinstance(ek_public_key, rsa.RSAPublicKey) and ek_public_key.key_size == 2048
    ecc_ek = isinstance(ek_public_key, ec.EllipticCurvePublicKey) and \
        isinstance(ek_public_key.curve, ec.SECP256R1)
    if not (rsa_ek or ecc_ek):
        raise _fail("credential activation supports RSA-2048 and ECC P-256 EKs only")
    if len(ak_name) != 34 or ak_name[:2] != b"\x00\x0b":
        raise _fail("AK name must be a SHA-256 TPM Name (34 bytes)")
    secret = os.urandom(32) if secret is None else secret
    if not 1 <= len(secret) <= 32:
        raise _fail("credential secret must be 1..32 bytes")
    if isinstance(ek_public_key, ec.EllipticCurvePublicKey):
        seed, encrypted_seed = _ecc_seed(ek_public_key)
    else:
        seed = os.urandom(32)
        encrypted_seed = ek_public_key.encrypt(seed, padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\x00"))
    sym_key = _kdfa(seed, b"STORAGE", ak_name, 128)
    enc_identity = _aes_cfb_encrypt(sym_key, struct.pack(">H", len(secret)) + secret)
    hmac_key = _kdfa(seed, b"INTEGRITY", b"", 256)
    outer = hmac.new(hmac_key, enc_identity + ak_name, hashlib.sha256).digest()
    id_object = struct.pack(">H", len(outer)) + outer + enc_identity
    return CredentialChallenge(
        secret=secret,
        credential_blob=struct.pack(">H", len(id_object)) + id_object,
        encrypted_secret=struct.pack(">H", len(encrypted_seed)) + encrypted_seed,
    )
