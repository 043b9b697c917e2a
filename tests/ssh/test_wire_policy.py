"""The agent codec and the ``ssh`` policy kind, with plain tables (no daemon)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from badged.errors import ConfigError
from badged.policy.loader import parse_policy
from badged.policy.model import Request, evaluate
from badged.sshagent import wire

POLICY = """
[bundle.git-only]
kinds = ["ssh"]
ssh_namespaces = ["git"]
ssh_hosts = ["SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]
ssh_users = ["git"]

[[agent]]
name = "a"
selectors = ["unix:uid:1000"]
bundles = ["git-only"]
"""
HOST = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def _decide(*, ssh_purpose: str = "", ssh_namespace: str = "", ssh_host: str = "",
            ssh_user: str = "") -> bool:
    policy = parse_policy(POLICY, "p.toml")
    req = Request(kind="ssh", agent="a", ssh_purpose=ssh_purpose, ssh_namespace=ssh_namespace,
                  ssh_host=ssh_host, ssh_user=ssh_user)
    return evaluate(policy, frozenset({"unix:uid:1000"}), req, now=0, default_ttl=60).allowed


def test_policy_ssh_kind_narrows_namespace_host_and_user() -> None:
    assert _decide(ssh_purpose="sshsig", ssh_namespace="git")
    assert not _decide(ssh_purpose="sshsig", ssh_namespace="file")
    assert _decide(ssh_purpose="auth", ssh_user="git", ssh_host=HOST)
    assert not _decide(ssh_purpose="auth", ssh_user="root", ssh_host=HOST)
    assert not _decide(ssh_purpose="auth", ssh_user="git", ssh_host="")  # no session-bind
    assert not _decide(ssh_purpose="auth", ssh_user="git", ssh_host="SHA256:other")
    assert not _decide(ssh_purpose="")  # unclassified: refused by default


def test_policy_ssh_keys_need_kind_ssh() -> None:
    with pytest.raises(ConfigError, match="needs kind 'ssh'"):
        parse_policy(POLICY.replace('kinds = ["ssh"]', 'kinds = ["sign"]'), "p.toml")
    with pytest.raises(ConfigError, match="fingerprint"):
        parse_policy(POLICY.replace(HOST, "github.com"), "p.toml")


def _userauth(session: bytes, user: bytes, key_blob: bytes, host: bytes = b"") -> bytes:
    method = b"publickey-hostbound-v00@openssh.com" if host else b"publickey"
    return (wire.string(session) + bytes([50]) + wire.string(user) + wire.string(b"ssh-connection")
            + wire.string(method) + b"\x01" + wire.string(b"ecdsa-sha2-nistp256")
            + wire.string(key_blob) + (wire.string(host) if host else b""))


def test_classify_userauth_sshsig_and_junk() -> None:
    sd = wire.classify(_userauth(b"s" * 32, b"git", b"KEY"))
    assert (sd.purpose, sd.user, sd.key_blob) == ("auth", "git", b"KEY")
    sig = b"SSHSIG" + wire.string(b"git") + wire.string(b"") + wire.string(b"sha512") + \
        wire.string(bytes(64))
    assert wire.classify(sig).namespace == "git"
    assert wire.classify(sig + b"x").purpose == ""  # trailing bytes
    assert wire.classify(b"random bytes").purpose == ""
    assert wire.classify(_userauth(b"s" * 32, b"\x1b[2J", b"KEY")).purpose == ""


def test_session_bind_verified_by_the_host_key() -> None:
    host = ed25519.Ed25519PrivateKey.generate()
    raw = host.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    blob = wire.string(b"ssh-ed25519") + wire.string(raw)
    sid = b"i" * 32
    good = wire.string(b"ssh-ed25519") + wire.string(host.sign(sid))
    body = wire.string(blob) + wire.string(sid) + wire.string(good) + b"\x00"
    bind = wire.parse_session_bind(wire.Reader(body))
    assert bind.host_fingerprint.startswith("SHA256:") and not bind.forwarding
    forged = wire.string(b"ssh-ed25519") + wire.string(host.sign(b"other session"))
    with pytest.raises(wire.WireError):
        wire.parse_session_bind(wire.Reader(wire.string(blob) + wire.string(sid)
                                            + wire.string(forged) + b"\x00"))


def test_reader_refuses_lengths_past_the_message() -> None:
    with pytest.raises(wire.WireError):
        wire.parse_sign_request(wire.u32(0xFFFFFFFF) + b"x")
    with pytest.raises(wire.WireError):
        wire.parse_sign_request(wire.string(b"k") + wire.string(b"d") + wire.u32(0) + b"!")


def test_approval_detail_names_destination_or_namespace() -> None:
    """What `badgectl approvals` shows for an SSH request (item 2 of issue 19)."""
    from badged.service.admin import _approval_detail

    assert _approval_detail(Request(kind="ssh", agent="a", ssh_purpose="auth", ssh_user="git",
                                    ssh_host=HOST)) == f"ssh auth user=git host={HOST}"
    assert "no session-bind" in _approval_detail(Request(kind="ssh", agent="a",
                                                         ssh_purpose="auth", ssh_user="git"))
    assert _approval_detail(Request(kind="ssh", agent="a", ssh_purpose="sshsig",
                                    ssh_namespace="git")) == "ssh sshsig namespace=git"
    assert _approval_detail(Request(kind="token", agent="a")) == ""
