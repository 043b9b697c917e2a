"""An operator-run SSH CA: short-lived OpenSSH user certificates for agents' keys.

Servers that trust the organisation's CA (``TrustedUserCAKeys``) accept an
agent without its key in every ``authorized_keys``, and the certificate
expires on its own. The operator asks (``badgectl ssh cert AGENT``, admin
socket only); the daemon names the rest, never the request:

* the **public key** is the agent's current SSH key from the registry (the
  one the agent socket signs with; a rotation needs a new certificate);
* the **principals** are the ``ssh_principals`` of the bundles the policy
  binds the agent to (not step-up grants: a certificate outlives a grant);
  none, and no certificate is issued (an OpenSSH certificate without
  principals is valid for *every* user);
* the **key id** is the agent's SPIFFE ID and the serial is random, so
  sshd's log line names the agent and the certificate;
* validity starts a minute back (clock skew) and lasts at most
  :data:`MAX_VALIDITY_S`; no extensions (no pty, forwarding or user rc): a
  command or git over SSH needs none.

The CA key is a file the operator provides (``[ssh] ca_key``, OpenSSH
private key format, unencrypted, 0600, owned by the daemon's user); the
daemon refuses to start on anything looser. It is a software key: the
``cryptography`` SSH certificate builder signs only with one. Each
certificate is audited (``ssh.certificate.issued``, with serial, principals
and validity) before it is returned.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    SSHCertificateBuilder,
    SSHCertificateType,
    load_ssh_private_key,
    load_ssh_public_key,
)

from badged.core.jose import jwk_thumbprint
from badged.errors import ConfigError, FailedPreconditionError, InvalidRequestError
from badged.policy.model import Policy
from badged.sshagent.wire import ssh_line

if TYPE_CHECKING:
    from badged.service.deps import ServiceDeps

MAX_VALIDITY_S = 24 * 3600
DEFAULT_VALIDITY_S = 3600
BACKDATE_S = 60


@dataclass(frozen=True)
class IssuedCertificate:
    line: str  # "ecdsa-sha2-nistp256-cert-v01@openssh.com AAAA... comment"
    serial: int
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    ca_fingerprint: str


CaKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def load_ca_key(path: Path) -> CaKey:
    """Read the CA key, refusing a file others could read or replace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open [ssh] ca_key: {exc.strerror}", path=str(path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("[ssh] ca_key is not a regular file", path=str(path))
        if st.st_mode & 0o077:
            raise ConfigError(f"[ssh] ca_key mode {stat.S_IMODE(st.st_mode):04o} is too open; "
                              "use 0600", path=str(path))
        if st.st_uid != os.geteuid():
            raise ConfigError("[ssh] ca_key is not owned by the daemon's user", path=str(path))
        data = os.read(fd, 64 * 1024)
    finally:
        os.close(fd)
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"[ssh] ca_key is not an unencrypted OpenSSH private key: {exc}",
                          path=str(path)) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError("[ssh] ca_key must be an ed25519 or ECDSA key", path=str(path))
    return key


class SshCa:
    """Signs user certificates with the operator's CA key."""

    def __init__(self, key: CaKey) -> None:
        self._key = key
        self.public_line = key.public_key().public_bytes(
            Encoding.OpenSSH, PublicFormat.OpenSSH).decode()

    def issue(self, *, public_line: str, key_id: str, principals: tuple[str, ...], now: float,
              validity: int) -> IssuedCertificate:
        """One user certificate; the caller has checked principals and validity."""
        if not principals:
            raise ValueError("a certificate without principals is valid for every user")
        if not 0 < validity <= MAX_VALIDITY_S:
            raise ValueError(f"validity must be 1..{MAX_VALIDITY_S} seconds")
        pub = load_ssh_public_key(public_line.encode())
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise ValueError("agent SSH keys are ECDSA P-256")
        serial = secrets.randbits(64)
        after, before = int(now) - BACKDATE_S, int(now) + validity
        cert = (SSHCertificateBuilder()
                .public_key(pub)
                .serial(serial)
                .type(SSHCertificateType.USER)
                .key_id(key_id.encode())
                .valid_principals([p.encode() for p in principals])
                .valid_after(after)
                .valid_before(before)
                .sign(self._key))
        line = f"{cert.public_bytes().decode()} {key_id}"
        return IssuedCertificate(line=line, serial=serial, principals=principals,
                                 valid_after=after, valid_before=before,
                                 ca_fingerprint=_fingerprint(self.public_line))


def _fingerprint(line: str) -> str:
    import base64
    import hashlib

    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def principals_for(policy: Policy, agent: str) -> tuple[str, ...]:
    """``ssh_principals`` of the bundles (and baseline) the policy binds ``agent`` to."""
    out: set[str] = set()
    if policy.baseline is not None:
        out |= policy.baseline.ssh_principals
    for rule in policy.agents:
        if rule.agent != agent:
            continue
        for name in rule.bundles:
            bundle = policy.bundles.get(name)
            if bundle is not None:
                out |= bundle.ssh_principals
    return tuple(sorted(out))


async def issue_for_agent(deps: ServiceDeps, ca: SshCa, agent: str, validity: int,
                          caller: Mapping[str, object]) -> IssuedCertificate:
    """The admin call behind ``badgectl ssh cert``: checks, signs, audits, returns."""
    if not 0 < validity <= MAX_VALIDITY_S:
        why = f"validity must be 1..{MAX_VALIDITY_S} seconds (24h)"
        raise InvalidRequestError(why, public=why)
    rec = deps.agents.active(agent)  # NotFound / revoked: FailedPrecondition
    jwk = rec.current.ssh_jwk
    if not jwk:
        raise FailedPreconditionError(f"agent {agent} has no SSH key ([ssh] socket off when "
                                      "it was made; it gets one at the next start)",
                                      public="the agent has no SSH key yet")
    principals = principals_for(deps.policy.current, agent)
    if not principals:
        raise FailedPreconditionError(
            f"no ssh_principals in the bundles bound to agent {agent}",
            public="no ssh_principals in the policy for this agent")
    cert = ca.issue(public_line=ssh_line(jwk, rec.spiffe_id), key_id=rec.spiffe_id,
                    principals=principals, now=deps.clock(), validity=validity)
    await deps.audit.append({
        "event": "ssh.certificate.issued", "agent": agent, "caller": dict(caller),
        "decision": "allow", "serial": str(cert.serial), "principals": list(principals),
        "valid_after": cert.valid_after, "valid_before": cert.valid_before,
        "key_id": rec.spiffe_id, "kid": jwk_thumbprint(jwk), "ca": cert.ca_fingerprint})
    return cert
