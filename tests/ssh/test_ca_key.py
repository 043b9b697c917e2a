"""The SSH CA key file ([ssh] ca_key): refused when others could read it (issue 19)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from badged.errors import ConfigError
from badged.sshagent.ca import MAX_VALIDITY_S, SshCa, load_ca_key


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_ca_key_file_must_be_private_unencrypted_ed25519_or_ecdsa(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    assert isinstance(load_ca_key(_write(tmp_path / "ok", pem, 0o600)), ed25519.Ed25519PrivateKey)
    with pytest.raises(ConfigError, match="too open"):
        load_ca_key(_write(tmp_path / "loose", pem, 0o644))
    os.symlink(tmp_path / "ok", tmp_path / "link")
    with pytest.raises(ConfigError, match="cannot open"):
        load_ca_key(tmp_path / "link")  # O_NOFOLLOW: a planted symlink is not followed
    with pytest.raises(ConfigError, match="unencrypted OpenSSH"):
        load_ca_key(_write(tmp_path / "junk", b"-----BEGIN NOTHING-----\n", 0o600))
    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    with pytest.raises(ConfigError, match="ed25519 or ECDSA"):
        load_ca_key(_write(tmp_path / "rsa", rsa_pem, 0o600))


def test_ca_refuses_certificates_valid_for_everyone_or_for_too_long() -> None:
    ca = SshCa(ed25519.Ed25519PrivateKey.generate())
    line = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    with pytest.raises(ValueError, match="every user"):
        ca.issue(public_line=line, key_id="a", principals=(), now=1e9, validity=60)
    with pytest.raises(ValueError, match="validity"):
        ca.issue(public_line=line, key_id="a", principals=("git",), now=1e9,
                 validity=MAX_VALIDITY_S + 1)
    cert = ca.issue(public_line=line, key_id="a", principals=("git",), now=1e9, validity=60)
    assert cert.valid_before - cert.valid_after == 120 and cert.principals == ("git",)


def test_config_ca_key_needs_the_ssh_socket(tmp_path: Path) -> None:
    from badged.config import load_config

    p = tmp_path / "badged.toml"
    p.write_text('[keystore]\nuri = "pkcs11:token=x"\n[ssh]\nca_key = "/etc/badged/ssh-ca"\n')
    with pytest.raises(ConfigError, match="needs \\[ssh\\] socket"):
        load_config(p)
    p.write_text('[keystore]\nuri = "pkcs11:token=x"\n[ssh]\nca_key = "/etc/badged/ssh-ca"\n'
                 'socket = "/run/badged/ssh-agent.sock"\n')
    assert load_config(p).ssh_ca_key == Path("/etc/badged/ssh-ca")
