"""The operations the load generator times, built inside each worker process.

Each factory does its setup (connect, log in, find the key) once, checks one
result for real (a signature that verifies, a token that is not empty), and
returns ``(op, close)``: ``op()`` is the timed call, with nothing else in it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Op = Callable[[], object]
Close = Callable[[], None]

DATA = b"badgebench: 32 bytes of payload!"


@dataclass(frozen=True)
class OpSpec:
    """What one worker process does; plain data, so it crosses a spawn boundary."""

    kind: str
    params: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def make(spec: OpSpec) -> tuple[Op, Close]:
    os.environ.update(spec.env)
    factory = _FACTORIES.get(spec.kind)
    if factory is None:
        raise ValueError(f"unknown op kind {spec.kind!r}")
    return factory(spec.params)


def preload(spec: OpSpec) -> None:
    """Import what ``make`` will need, so that timed set-up is only set-up."""
    import cryptography.hazmat.primitives.asymmetric.ec  # noqa: F401

    if spec.kind == "pkcs11":
        import pkcs11  # noqa: F401
    elif spec.kind.startswith("badged-"):
        import badged_proto.v1.workload_pb2  # noqa: F401
    elif spec.kind.startswith("badgeclient-"):
        import badgeclient  # noqa: F401


# -- helpers ---------------------------------------------------------------------


def _verify_raw_ecdsa(public_der: str, raw: bytes, digest: bytes) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

    pub = serialization.load_der_public_key(bytes.fromhex(public_der))
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    half = len(raw) // 2
    der = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    pub.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


# -- in-process / remoted PKCS#11 --------------------------------------------------


def _pkcs11(params: dict[str, str]) -> tuple[Op, Close]:
    """CKM_ECDSA over a SHA-256 digest, on one logged-in session, handle cached.

    With ``module`` = p11-kit-client.so (and P11_KIT_SERVER_ADDRESS in the
    environment) the same code measures p11-kit's remoting of the token.
    """
    import pkcs11

    lib = pkcs11.lib(params["module"])
    try:
        token = lib.get_token(token_label=params["token"])
    except pkcs11.exceptions.NoSuchToken:
        lib.reinitialize()  # rescan the slots before the caller's retry
        raise
    with open(params["pin_file"]) as fh:
        pin = fh.read().strip()
    session = token.open(user_pin=pin)
    key: Any = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=params["key"])
    mech = pkcs11.Mechanism.ECDSA
    digest = hashlib.sha256(DATA).digest()
    _verify_raw_ecdsa(params["public_der"], bytes(key.sign(digest, mechanism=mech)), digest)
    sha256 = hashlib.sha256
    sign = key.sign

    def op() -> object:
        return sign(sha256(DATA).digest(), mechanism=mech)

    def close() -> None:
        session.close()

    return op, close


# -- CPU limit -------------------------------------------------------------------------


def _crypto(params: dict[str, str]) -> tuple[Op, Close]:
    """OpenSSL's P-256 through `cryptography`: a software key, the CPU's limit."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    algo = ec.ECDSA(hashes.SHA256())
    key.public_key().verify(key.sign(DATA, algo), DATA, algo)
    sign = key.sign

    def op() -> object:
        return sign(DATA, algo)

    return op, lambda: None


# -- OpenSSH agent protocol --------------------------------------------------------------

SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14


def _sshstr(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _read_exact(sock: socket.socket, n: int, buf: bytearray) -> memoryview:
    if len(buf) < n:
        buf.extend(bytes(n - len(buf)))
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:n], n - got)
        if k == 0:
            raise ConnectionError("ssh-agent closed the connection")
        got += k
    return view[:n]


def _agent_call(sock: socket.socket, payload: bytes, buf: bytearray) -> memoryview:
    sock.sendall(struct.pack(">I", len(payload)) + payload)
    (length,) = struct.unpack(">I", _read_exact(sock, 4, buf))
    return _read_exact(sock, length, buf)


def parse_ssh_strings(data: bytes, count: int) -> tuple[list[bytes], bytes]:
    out = []
    for _ in range(count):
        (n,) = struct.unpack(">I", data[:4])
        out.append(data[4:4 + n])
        data = data[4 + n:]
    return out, data


def ssh_identities(sock_path: str) -> list[tuple[bytes, str]]:
    """(key blob, comment) of every key the agent holds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(sock_path)
        reply = bytes(_agent_call(sock, bytes([SSH_AGENTC_REQUEST_IDENTITIES]), bytearray()))
    if reply[0] != SSH_AGENT_IDENTITIES_ANSWER:
        raise RuntimeError(f"ssh-agent answered {reply[0]} to REQUEST_IDENTITIES")
    (n,) = struct.unpack(">I", reply[1:5])
    rest, out = reply[5:], []
    for _ in range(n):
        (blob, comment), rest = parse_ssh_strings(rest, 2)
        out.append((blob, comment.decode(errors="replace")))
    return out


def ecdsa_blob(public_der: str) -> bytes:
    """The SSH wire blob of a P-256 public key (to pick it among the agent's keys)."""
    from cryptography.hazmat.primitives import serialization

    pub = serialization.load_der_public_key(bytes.fromhex(public_der))
    point = pub.public_bytes(serialization.Encoding.X962,
                             serialization.PublicFormat.UncompressedPoint)
    return _sshstr(b"ecdsa-sha2-nistp256") + _sshstr(b"nistp256") + _sshstr(point)


def _ssh_agent(params: dict[str, str]) -> tuple[Op, Close]:
    """SSH2_AGENTC_SIGN_REQUEST on one persistent connection (what `ssh` sends)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    blob = bytes.fromhex(params["blob"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(params["socket"])
    body = bytes([SSH_AGENTC_SIGN_REQUEST]) + _sshstr(blob) + _sshstr(DATA) + struct.pack(">I", 0)
    request = struct.pack(">I", len(body)) + body
    buf = bytearray(4096)

    # Check one answer for real: type 14 and a signature that verifies.
    reply = bytes(_agent_call(sock, body, buf))
    if reply[0] != SSH_AGENT_SIGN_RESPONSE:
        raise RuntimeError(f"ssh-agent refused to sign (message {reply[0]})")
    (sig,), _ = parse_ssh_strings(reply[1:], 1)
    (algo, inner), _ = parse_ssh_strings(sig, 2)
    assert algo == b"ecdsa-sha2-nistp256", algo
    (r, s), _ = parse_ssh_strings(inner, 2)
    pub = serialization.load_der_public_key(bytes.fromhex(params["public_der"]))
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big")), DATA,
               ec.ECDSA(hashes.SHA256()))

    sendall = sock.sendall
    recv_into = sock.recv_into
    view = memoryview(buf)
    unpack = struct.unpack

    def op() -> object:
        sendall(request)
        got = 0
        need = 4
        while got < need:  # one recv almost always returns the whole answer
            k = recv_into(view[got:], len(buf) - got)
            if k == 0:
                raise ConnectionError("ssh-agent closed the connection")
            got += k
            if need == 4 and got >= 4:
                need = 4 + unpack(">I", view[:4])[0]
        if view[4] != SSH_AGENT_SIGN_RESPONSE:
            raise RuntimeError(f"ssh-agent failed to sign (message {view[4]})")
        return got

    return op, sock.close


# -- badged ----------------------------------------------------------------------------------

FETCH_PATH = "/badged.v1.WorkloadService/FetchToken"
SIGN_PATH = "/badged.v1.WorkloadService/Sign"


def _check_token(token: str) -> None:
    import base64
    import json

    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise RuntimeError("badged returned something that is not a JWS")
    header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    if header.get("alg") != "ES256":
        raise RuntimeError(f"unexpected token alg {header.get('alg')!r}")


def _check_signature(signature: bytes, message: bytes, public_pem: str) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    pub = serialization.load_pem_public_key(public_pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    if len(signature) == 64:  # raw r||s (JOSE style)
        signature = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                         int.from_bytes(signature[32:], "big"))
    pub.verify(signature, message, ec.ECDSA(hashes.SHA256()))


def _badged_h2(params: dict[str, str], kind: str) -> tuple[Op, Close]:
    """badged over the lean HTTP/2 client (see h2grpc): the daemon's own capacity."""
    from badgebench.h2grpc import GrpcCallError, H2GrpcChannel
    from badged_proto.v1 import workload_pb2

    ch = H2GrpcChannel(params["socket"])
    unary = ch.unary
    if kind == "fetch":
        path = FETCH_PATH
        request = workload_pb2.FetchTokenRequest(
            audience=params["audience"], scopes=params["scopes"].split(","),
            ttl_seconds=int(params.get("ttl", "60"))).SerializeToString()
    else:
        path = SIGN_PATH
        request = workload_pb2.SignRequest(data=DATA).SerializeToString()
    try:
        first = unary(path, request)
    except GrpcCallError as exc:
        raise RuntimeError(f"{exc}; {_explain(params['socket'], path, request)}") from None
    if kind == "fetch":
        _check_token(workload_pb2.FetchTokenResponse.FromString(first).token)
    else:
        r = workload_pb2.SignResponse.FromString(first)
        _check_signature(r.signature, r.signed_message, r.public_key_pem)

    def op() -> object:
        return unary(path, request)

    return op, ch.close


def _explain(socket_path: str, path: str, request: bytes) -> str:
    """Repeat a failed call through grpcio, which decodes the status for us."""
    import grpc

    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        call: Any = channel.unary_unary(path)
        try:
            call(request, timeout=10)
        except grpc.RpcError as err:
            return f"grpcio says {err.code().name}: {err.details()}"
    return "grpcio got an answer"


def _badgeclient(params: dict[str, str], kind: str) -> tuple[Op, Close]:
    """badged through the official client library (grpcio): what an agent sees."""
    from badgeclient import WorkloadClient

    client = WorkloadClient(params["socket"])
    if kind == "fetch":
        audience = params["audience"]
        scopes = params["scopes"].split(",")
        ttl = int(params.get("ttl", "60"))
        _check_token(client.fetch_token(audience=audience, scopes=scopes, ttl_seconds=ttl).token)
        fetch = client.fetch_token

        def op() -> object:
            return fetch(audience=audience, scopes=scopes, ttl_seconds=ttl)

        return op, client.close
    r = client.sign(DATA)
    _check_signature(r.signature, r.signed_message, r.public_key_pem)
    sign = client.sign

    def op_sign() -> object:
        return sign(DATA)

    return op_sign, client.close


def _ssh_sshsig(params: dict[str, str]) -> tuple[Op, Close]:
    from badgebench.ssh import sshsig_op  # issue 19's rows: badgebench.ssh

    return sshsig_op(params)


_FACTORIES: dict[str, Callable[[dict[str, str]], tuple[Op, Close]]] = {
    "ssh-sshsig": _ssh_sshsig,
    "pkcs11": _pkcs11,
    "crypto": _crypto,
    "ssh-agent": _ssh_agent,
    "badged-fetch": lambda p: _badged_h2(p, "fetch"),
    "badged-sign": lambda p: _badged_h2(p, "sign"),
    "badgeclient-fetch": lambda p: _badgeclient(p, "fetch"),
    "badgeclient-sign": lambda p: _badgeclient(p, "sign"),
}
