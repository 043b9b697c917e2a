"""badged's SSH agent socket with the real OpenSSH tools (issue 19).

The daemon runs as root (``badged dev``: the demo agent is bound to the
invoking uid, with kind ``ssh`` and SSHSIG namespaces git and file). Attacks
run as ``nobody`` in a setuid child, the way another local user would.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from badged.sshagent import wire
from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon, badgectl_cmd
from tests.ssh.conftest import NOBODY, RawAgentClient, agent_sock, audit_records, run, ssh_env

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs attackers as nobody: needs root")
SPIFFE = "spiffe://example.org/agent/demo-agent"
# Run as nobody with the system Python (stdlib only): send one raw agent
# message, print the reply's type byte in hex.
RAW_SIGN = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
head = s.recv(4)
n = int.from_bytes(head, "big")
body = b""
while len(body) < n:
    body += s.recv(n - len(body))
print(body[:1].hex())
"""


@pytest.fixture
def work() -> Iterator[Path]:
    base = short_tmpdir("bsw")
    os.chmod(base, 0o777)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def pubkey(d: RunningDaemon) -> str:
    out = run(d, "ssh-add", "-L")
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().strip()


def test_ssh_add_lists_exactly_the_bound_agent_key(sshd_daemon: RunningDaemon) -> None:
    lines = pubkey(sshd_daemon).splitlines()
    assert len(lines) == 1
    kind, _, comment = lines[0].split(" ")
    assert kind == "ecdsa-sha2-nistp256" and comment == SPIFFE


def test_sshsig_git_signature_verifies(sshd_daemon: RunningDaemon, work: Path) -> None:
    pub = pubkey(sshd_daemon)
    (work / "key.pub").write_text(pub + "\n")
    (work / "msg").write_bytes(b"release v1\n")
    signed = run(sshd_daemon, "ssh-keygen", "-Y", "sign", "-n", "git", "-f", "key.pub", "msg",
                 cwd=work)
    assert signed.returncode == 0, signed.stderr
    (work / "allowed").write_text(f"demo {pub}\n")
    verified = run(sshd_daemon, "ssh-keygen", "-Y", "verify", "-f", "allowed", "-I", "demo",
                   "-n", "git", "-s", "msg.sig", cwd=work, stdin=b"release v1\n")
    assert verified.returncode == 0, verified.stderr
    rec = [r for r in audit_records(sshd_daemon) if r.get("event") == "ssh.signed"][-1]
    ssh = rec["ssh"]
    assert isinstance(ssh, dict)
    assert ssh["purpose"] == "sshsig" and ssh["namespace"] == "git"
    assert rec["agent"] == "demo-agent" and rec["decision"] == "allow"


def test_unbound_namespace_refused_and_audited(sshd_daemon: RunningDaemon, work: Path) -> None:
    (work / "key.pub").write_text(pubkey(sshd_daemon) + "\n")
    (work / "msg").write_bytes(b"x\n")
    out = run(sshd_daemon, "ssh-keygen", "-Y", "sign", "-n", "ci-deploy", "-f", "key.pub", "msg",
              cwd=work)
    assert out.returncode != 0
    assert not (work / "msg.sig").exists()
    denied = [r for r in audit_records(sshd_daemon) if r.get("event") == "ssh.denied"
              and isinstance(r.get("request"), dict)]
    assert any(r["request"]["ssh"]["namespace"] == "ci-deploy" for r in denied  # type: ignore[index]
               ), denied


def test_git_commit_signed_through_the_agent(sshd_daemon: RunningDaemon, work: Path) -> None:
    pub = pubkey(sshd_daemon)
    (work / "allowed").write_text(f"agent@example.org {pub}\n")
    repo = work / "repo"

    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return run(sshd_daemon, "git", "-C", str(repo), "-c", "gpg.format=ssh",
                   "-c", f"user.signingkey=key::{pub}",
                   "-c", f"gpg.ssh.allowedSignersFile={work / 'allowed'}",
                   "-c", "user.name=agent", "-c", "user.email=agent@example.org", *args)

    repo.mkdir()
    assert git("init", "-q").returncode == 0
    (repo / "f").write_text("x\n")
    assert git("add", "f").returncode == 0
    commit = git("commit", "-q", "-S", "-m", "signed by the agent's hardware key")
    assert commit.returncode == 0, commit.stderr
    check = git("verify-commit", "HEAD")
    assert check.returncode == 0, check.stderr
    assert b"Good \"git\" signature" in check.stderr


@needs_root
def test_other_uid_sees_no_key_and_cannot_sign(sshd_daemon: RunningDaemon, work: Path) -> None:
    pub = pubkey(sshd_daemon)  # the attacker knows the public key
    (work / "key.pub").write_text(pub + "\n")
    (work / "msg").write_bytes(b"x\n")
    os.chmod(work / "key.pub", 0o644)
    os.chmod(work / "msg", 0o644)
    listed = run(sshd_daemon, "ssh-add", "-L", uid=NOBODY)
    assert listed.returncode != 0 and b"ecdsa" not in listed.stdout
    out = run(sshd_daemon, "ssh-keygen", "-Y", "sign", "-n", "git", "-f", "key.pub", "msg",
              uid=NOBODY, cwd=work)
    assert out.returncode != 0
    assert not (work / "msg.sig").exists()
    # ssh-keygen gives up when the agent does not list the key; the attack
    # sends the sign request for the known key anyway, byte by byte.
    blob = base64.b64decode(pub.split(" ")[1])
    data = (b"SSHSIG" + wire.string(b"git") + wire.string(b"") + wire.string(b"sha512")
            + wire.string(bytes(64)))
    request = wire.frame(wire.SSH_AGENTC_SIGN_REQUEST,
                         wire.string(blob) + wire.string(data) + wire.u32(0))
    attack = run(sshd_daemon, "/usr/bin/python3", "-c", RAW_SIGN, str(agent_sock(sshd_daemon)),
                 request.hex(), uid=NOBODY)
    assert attack.returncode == 0, attack.stderr
    assert attack.stdout.strip() == b"05"  # SSH_AGENT_FAILURE, no signature
    denied = [r for r in audit_records(sshd_daemon) if r.get("event") == "ssh.denied"]
    callers = [r.get("caller") for r in denied]
    assert any(isinstance(c, dict) and c.get("uid") == NOBODY for c in callers)


def test_agent_changing_messages_refused(sshd_daemon: RunningDaemon, work: Path) -> None:
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    assert run(sshd_daemon, "ssh-add", str(key)).returncode != 0
    assert run(sshd_daemon, "ssh-add", "-D").returncode != 0
    # ssh-add -x / -X ask for the lock password: give it through SSH_ASKPASS.
    askpass = work / "askpass"
    askpass.write_text("#!/bin/sh\necho hunter2\n")
    askpass.chmod(0o755)
    env = dict(ssh_env(sshd_daemon), SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force",
               DISPLAY=":0")
    for flag in ("-x", "-X"):
        out = subprocess.run(["ssh-add", flag], env=env, capture_output=True, timeout=30,
                             stdin=subprocess.DEVNULL, check=False)
        assert out.returncode != 0, (flag, out.stderr)
        assert b"Failed" in out.stderr or b"failed" in out.stderr, (flag, out.stderr)
    client = RawAgentClient(agent_sock(sshd_daemon))
    try:
        for msg in (wire.frame(wire.SSH_AGENTC_LOCK, wire.string(b"pw")),
                    wire.frame(wire.SSH_AGENTC_REMOVE_ALL_IDENTITIES),
                    wire.frame(wire.SSH_AGENTC_ADD_SMARTCARD_KEY,
                               wire.string(b"/usr/lib/softhsm/libsofthsm2.so") + wire.string(b""))):
            client.send(msg)
            assert client.reply() == bytes([wire.SSH_AGENT_FAILURE])
    finally:
        client.close()
    assert len(pubkey(sshd_daemon).splitlines()) == 1  # still the one key, unlocked
    refused = {r["ssh"]["message"] for r in audit_records(sshd_daemon)  # type: ignore[index]
               if r.get("event") == "ssh.denied" and isinstance(r.get("ssh"), dict)
               and "message" in r["ssh"]}  # type: ignore[operator]
    assert {wire.SSH_AGENTC_ADD_IDENTITY, wire.SSH_AGENTC_REMOVE_ALL_IDENTITIES,
            wire.SSH_AGENTC_LOCK, wire.SSH_AGENTC_UNLOCK,
            wire.SSH_AGENTC_ADD_SMARTCARD_KEY} <= refused, refused


def test_malformed_and_oversized_messages_answered_with_failure(
        sshd_daemon: RunningDaemon) -> None:
    client = RawAgentClient(agent_sock(sshd_daemon))
    try:
        # Truncated sign request, trailing bytes, unknown type: failure, same connection.
        for body in (wire.u32(1000) + b"abc", b"", ):
            client.send(wire.frame(wire.SSH_AGENTC_SIGN_REQUEST, body))
            assert client.reply() == bytes([wire.SSH_AGENT_FAILURE])
        client.send(wire.frame(wire.SSH_AGENTC_REQUEST_IDENTITIES, b"junk"))
        assert client.reply() == bytes([wire.SSH_AGENT_FAILURE])
        client.send(wire.frame(200))
        assert client.reply() == bytes([wire.SSH_AGENT_FAILURE])
        # A signature over unclassifiable data: refused by default.
        client.send(wire.frame(wire.SSH_AGENTC_REQUEST_IDENTITIES))
        ids = client.reply()
        assert ids is not None and ids[0] == wire.SSH_AGENT_IDENTITIES_ANSWER
        r = wire.Reader(ids[1:])
        assert r.u32() == 1
        key_blob = r.string()
        client.send(wire.frame(wire.SSH_AGENTC_SIGN_REQUEST,
                               wire.string(key_blob) + wire.string(b"any bytes") + wire.u32(0)))
        assert client.reply() == bytes([wire.SSH_AGENT_FAILURE])
        # Oversized: refused before it is buffered, then the connection closes.
        client.send(wire.u32(wire.MAX_MESSAGE + 1) + bytes([wire.SSH_AGENTC_SIGN_REQUEST]))
        assert client.reply() == bytes([wire.SSH_AGENT_FAILURE])
        assert client.reply() is None
    finally:
        client.close()
    assert sshd_daemon.proc.poll() is None
    assert len(pubkey(sshd_daemon).splitlines()) == 1


# Connects and asks for the identities; then (with "exec") hands the
# connection to bash, which asks again on the inherited socket: the daemon
# must see the exec.
EXEC_AFTER_CONNECT = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def ask():
    s.sendall(bytes([0, 0, 0, 1, 11]))
    head = s.recv(4, socket.MSG_WAITALL)
    return head + s.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
if sys.argv[2] == "exec":
    # One answered request first: the daemon has accepted (and taken its
    # snapshot of python); an exec before the accept is a documented limit.
    assert ask()[4] == 12
    os.dup2(s.fileno(), 3)
    os.set_inheritable(3, True)  # dup2 onto itself keeps CLOEXEC
    os.execv("/bin/bash", ["bash", "-c",
             "printf '\\x00\\x00\\x00\\x01\\x0b' >&3; head -c 5 <&3 | od -An -tx1"])
print(" ".join(f"{b:02x}" for b in ask()[:5]))
"""


def test_exec_after_connect_loses_the_identity(sshd_daemon: RunningDaemon) -> None:
    sock = str(agent_sock(sshd_daemon))
    control = run(sshd_daemon, "/usr/bin/python3", "-c", EXEC_AFTER_CONNECT, sock, "stay")
    assert control.stdout.split()[4] == b"0c", control  # IDENTITIES_ANSWER
    attack = run(sshd_daemon, "/usr/bin/python3", "-c", EXEC_AFTER_CONNECT, sock, "exec")
    assert attack.stdout.split() == [b"00", b"00", b"00", b"01", b"05"], attack  # FAILURE


def test_badgectl_ssh_pubkey_prints_the_listed_key(sshd_daemon: RunningDaemon) -> None:
    out = subprocess.run(badgectl_cmd("ssh", "pubkey", "demo-agent"), env=sshd_daemon.env(),
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == pubkey(sshd_daemon)
    signer = subprocess.run(badgectl_cmd("ssh", "pubkey", "demo-agent", "--principal", "a@b"),
                            env=sshd_daemon.env(), capture_output=True, text=True, timeout=30,
                            check=False)
    assert signer.stdout.strip() == f"a@b {pubkey(sshd_daemon)}"
