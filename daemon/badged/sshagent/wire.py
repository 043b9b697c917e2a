"""The SSH agent wire format, bounded and strictly checked.

draft-ietf-sshm-ssh-agent (formerly draft-miller-ssh-agent) and OpenSSH's
PROTOCOL.agent: every message is ``uint32 length || byte type || body``; the
body is made of SSH strings (``uint32 length || bytes``, RFC 4251). Nothing
here trusts a length: each read checks it against what is left of the
message, a message must be consumed exactly (trailing bytes are an error),
and a frame above :data:`MAX_MESSAGE` is refused before it is buffered
(OpenSSH's ssh-agent uses the same 256 KiB cap).

Also here: what the agent can *see* of the data it is asked to sign
(:func:`classify`): an SSH user-authentication request (RFC 4252 §7, with
OpenSSH's ``publickey-hostbound-v00@openssh.com``), or an SSHSIG blob
(PROTOCOL.sshsig: ``ssh-keygen -Y sign``, git commit signing). Anything else
is "unclassified", which the policy refuses by default.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

MAX_MESSAGE = 256 * 1024

# Message numbers (draft-ietf-sshm-ssh-agent §6.1, PROTOCOL.agent).
SSH_AGENT_FAILURE = 5
SSH_AGENT_SUCCESS = 6
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14
SSH_AGENTC_ADD_IDENTITY = 17
SSH_AGENTC_REMOVE_IDENTITY = 18
SSH_AGENTC_REMOVE_ALL_IDENTITIES = 19
SSH_AGENTC_ADD_SMARTCARD_KEY = 20
SSH_AGENTC_REMOVE_SMARTCARD_KEY = 21
SSH_AGENTC_LOCK = 22
SSH_AGENTC_UNLOCK = 23
SSH_AGENTC_ADD_ID_CONSTRAINED = 25
SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED = 26
SSH_AGENTC_EXTENSION = 27
# Messages that would change the agent: refused, keys are the operator's.
MUTATING = frozenset({SSH_AGENTC_ADD_IDENTITY, SSH_AGENTC_REMOVE_IDENTITY,
                      SSH_AGENTC_REMOVE_ALL_IDENTITIES, SSH_AGENTC_ADD_SMARTCARD_KEY,
                      SSH_AGENTC_REMOVE_SMARTCARD_KEY, SSH_AGENTC_LOCK, SSH_AGENTC_UNLOCK,
                      SSH_AGENTC_ADD_ID_CONSTRAINED,
                      SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED})

# What ssh-add would have done, for the audit record's reason (no digits: the
# denial aggregator masks numbers, and each kind of refusal should show).
MUTATING_NAMES = {
    SSH_AGENTC_ADD_IDENTITY: "add identity (ssh-add)",
    SSH_AGENTC_REMOVE_IDENTITY: "remove identity (ssh-add -d)",
    SSH_AGENTC_REMOVE_ALL_IDENTITIES: "remove all identities (ssh-add -D)",
    SSH_AGENTC_ADD_SMARTCARD_KEY: "add smartcard key (ssh-add -s)",
    SSH_AGENTC_REMOVE_SMARTCARD_KEY: "remove smartcard key (ssh-add -e)",
    SSH_AGENTC_LOCK: "lock (ssh-add -x)",
    SSH_AGENTC_UNLOCK: "unlock (ssh-add -X)",
    SSH_AGENTC_ADD_ID_CONSTRAINED: "add constrained identity (ssh-add -c/-t/-h)",
    SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED: "add constrained smartcard key",
}

SESSION_BIND = b"session-bind@openssh.com"
KEY_TYPE = b"ecdsa-sha2-nistp256"
_CURVE = b"nistp256"
SSH_MSG_USERAUTH_REQUEST = 50
SSHSIG_MAGIC = b"SSHSIG"
# Longest SSH user name / namespace we record; longer ones are unclassified.
MAX_NAME = 256

_U32 = struct.Struct(">I")


class WireError(ValueError):
    """A malformed agent message: answered with SSH_AGENT_FAILURE."""


class Reader:
    """Reads one message body; every length checked against what is left."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes) -> None:
        self._buf = buf
        self._pos = 0

    def byte(self) -> int:
        if self._pos + 1 > len(self._buf):
            raise WireError("truncated byte")
        self._pos += 1
        return self._buf[self._pos - 1]

    def u32(self) -> int:
        if self._pos + 4 > len(self._buf):
            raise WireError("truncated uint32")
        (value,) = _U32.unpack_from(self._buf, self._pos)
        self._pos += 4
        return int(value)

    def raw(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._buf):
            raise WireError("truncated field")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def string(self) -> bytes:
        return self.raw(self.u32())

    def boolean(self) -> bool:
        value = self.byte()
        if value > 1:
            raise WireError("boolean not 0 or 1")
        return value == 1

    def mpint(self) -> int:
        data = self.string()
        if data and data[0] & 0x80:
            raise WireError("negative mpint")
        if len(data) > 1 and data[0] == 0 and not data[1] & 0x80:
            raise WireError("mpint not minimal")
        return int.from_bytes(data, "big")

    @property
    def left(self) -> int:
        return len(self._buf) - self._pos

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise WireError("trailing bytes")


def u32(value: int) -> bytes:
    return _U32.pack(value)


def string(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def mpint(value: int) -> bytes:
    if value == 0:
        return string(b"")
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return string(b"\x00" + raw if raw[0] & 0x80 else raw)


def frame(msg_type: int, body: bytes = b"") -> bytes:
    """One message on the wire: length, type, body."""
    return _U32.pack(len(body) + 1) + bytes((msg_type,)) + body


def failure() -> bytes:
    return frame(SSH_AGENT_FAILURE)


def success() -> bytes:
    return frame(SSH_AGENT_SUCCESS)


# -- keys and signatures -------------------------------------------------------------


def public_blob(key: ec.EllipticCurvePublicKey) -> bytes:
    """The ``ecdsa-sha2-nistp256`` public key blob (RFC 5656 §3.1)."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise WireError("only P-256 keys are served")
    point = key.public_numbers()
    q = b"\x04" + point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big")
    return string(KEY_TYPE) + string(_CURVE) + string(q)


def openssh_line(key: ec.EllipticCurvePublicKey, comment: str) -> str:
    """``ecdsa-sha2-nistp256 AAAA... comment``: for authorized_keys / allowed_signers."""
    return f"{KEY_TYPE.decode()} {base64.b64encode(public_blob(key)).decode()} {comment}"


def jwk_blob(jwk: dict[str, str]) -> bytes:
    """The SSH public key blob of a P-256 JWK (the registry's copy: no hardware call)."""

    def coord(name: str) -> bytes:
        raw = jwk[name]
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))

    return string(KEY_TYPE) + string(_CURVE) + string(b"\x04" + coord("x") + coord("y"))


def ssh_line(jwk: dict[str, str], comment: str) -> str:
    """An OpenSSH public key line from a P-256 JWK."""
    return f"{KEY_TYPE.decode()} {base64.b64encode(jwk_blob(jwk)).decode()} {comment}"


CERT_TYPE = b"ecdsa-sha2-nistp256-cert-v01@openssh.com"


def plain_key_blob(blob: bytes) -> bytes:
    """The public key inside an OpenSSH certificate blob; a plain key blob unchanged.

    ``ssh -o CertificateFile=`` with the key in the agent asks the agent to
    sign for the certificate (PROTOCOL.certkeys); the key that signs is the
    certificate's own public key.
    """
    r = Reader(blob)
    if r.string() != CERT_TYPE:
        return blob
    r.string()  # nonce
    curve, point = r.string(), r.string()
    return string(KEY_TYPE) + string(curve) + string(point)


def fingerprint(blob: bytes) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key blob (ssh-keygen -l)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def signature_blob(der: bytes) -> bytes:
    """A DER ECDSA signature as the SSH ``ecdsa-sha2-nistp256`` signature blob."""
    r, s = decode_dss_signature(der)
    return string(KEY_TYPE) + string(mpint(r) + mpint(s))


# -- requests ------------------------------------------------------------------------


@dataclass(frozen=True)
class SignRequest:
    key_blob: bytes
    data: bytes
    flags: int


def parse_sign_request(body: bytes) -> SignRequest:
    r = Reader(body)
    req = SignRequest(key_blob=r.string(), data=r.string(), flags=r.u32())
    r.end()
    return req


@dataclass(frozen=True)
class SessionBind:
    """``session-bind@openssh.com``: the client's word, checked by signature,
    that this connection serves the SSH session ``session_id`` with the
    server whose host key is ``host_key``."""

    host_key: bytes
    session_id: bytes
    forwarding: bool

    @property
    def host_fingerprint(self) -> str:
        return fingerprint(self.host_key)


def parse_extension(body: bytes) -> tuple[bytes, Reader]:
    r = Reader(body)
    return r.string(), r


def parse_session_bind(r: Reader) -> SessionBind:
    """Parse and *verify* a session-bind: the host key must have signed the session id.

    Without the check a client could bind any host key it likes and slip
    past a destination restriction.
    """
    host_key, session_id, signature, forwarding = r.string(), r.string(), r.string(), r.boolean()
    r.end()
    if not 0 < len(session_id) <= 64:
        raise WireError("bad session identifier")
    verify_host_signature(host_key, signature, session_id)
    return SessionBind(host_key=host_key, session_id=session_id, forwarding=forwarding)


_EC_CURVES: dict[bytes, tuple[ec.EllipticCurve, hashes.HashAlgorithm]] = {
    b"nistp256": (ec.SECP256R1(), hashes.SHA256()),
    b"nistp384": (ec.SECP384R1(), hashes.SHA384()),
    b"nistp521": (ec.SECP521R1(), hashes.SHA512()),
}


def verify_host_signature(host_key: bytes, signature: bytes, data: bytes) -> None:
    """Verify an SSH signature by a host key (ssh-ed25519, ecdsa-sha2-*, rsa-sha2-*)."""
    k = Reader(host_key)
    ktype = k.string()
    s = Reader(signature)
    stype = s.string()
    sig = s.string()
    s.end()
    try:
        if ktype == b"ssh-ed25519" and stype == ktype:
            pub = k.string()
            k.end()
            ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(sig, data)
            return
        if ktype.startswith(b"ecdsa-sha2-") and stype == ktype:
            curve_name = k.string()
            point = k.string()
            k.end()
            if curve_name not in _EC_CURVES or ktype != b"ecdsa-sha2-" + curve_name:
                raise WireError("unsupported host key curve")
            curve, digest = _EC_CURVES[curve_name]
            pub_ec = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
            rs = Reader(sig)
            der = encode_dss_signature(rs.mpint(), rs.mpint())
            rs.end()
            pub_ec.verify(der, data, ec.ECDSA(digest))
            return
        if ktype == b"ssh-rsa" and stype in (b"rsa-sha2-256", b"rsa-sha2-512"):
            e, n = k.mpint(), k.mpint()
            k.end()
            if n.bit_length() < 2048:
                raise WireError("RSA host key too small")
            pub_rsa = rsa.RSAPublicNumbers(e, n).public_key()
            algo: hashes.HashAlgorithm = (hashes.SHA256() if stype == b"rsa-sha2-256"
                                          else hashes.SHA512())
            pub_rsa.verify(sig, data, padding.PKCS1v15(), algo)
            return
    except (InvalidSignature, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError("host key signature does not verify") from None
    raise WireError("unsupported host key or signature type")


@dataclass(frozen=True)
class SignedData:
    """What the agent could tell about the bytes it is asked to sign."""

    purpose: str  # "auth" | "sshsig" | "" (unclassified: refused by default)
    user: str = ""
    service: str = ""
    session_id: bytes = b""
    host_key: bytes = b""  # in a publickey-hostbound-v00@openssh.com request
    namespace: str = ""
    key_blob: bytes = b""  # the public key the request names (must be ours)


def _text(raw: bytes) -> str:
    if len(raw) > MAX_NAME:
        raise WireError("name too long")
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError: unclassified
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in text):
        raise WireError("control character in name")
    return text


def classify(data: bytes) -> SignedData:
    """User auth, SSHSIG, or unclassified; never raises."""
    try:
        if data.startswith(SSHSIG_MAGIC):
            r = Reader(data[len(SSHSIG_MAGIC):])
            namespace = _text(r.string())
            r.string()  # reserved
            hash_alg = r.string()
            r.string()  # H(message)
            r.end()
            if not namespace or hash_alg not in (b"sha256", b"sha512"):
                return SignedData("")
            return SignedData("sshsig", namespace=namespace)
        r = Reader(data)
        session_id = r.string()
        if not 0 < len(session_id) <= 64 or r.byte() != SSH_MSG_USERAUTH_REQUEST:
            return SignedData("")
        user, service, method = _text(r.string()), _text(r.string()), r.string()
        if not r.boolean():
            return SignedData("")
        r.string()  # public key algorithm name
        key_blob = r.string()
        host_key = b""
        if method == b"publickey-hostbound-v00@openssh.com":
            host_key = r.string()
        elif method != b"publickey":
            return SignedData("")
        r.end()
        return SignedData("auth", user=user, service=service, session_id=session_id,
                          host_key=host_key, key_blob=key_blob)
    except ValueError:
        return SignedData("")
