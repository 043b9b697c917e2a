"""SSH certificates (issue 19 item 5): an operator-run CA, principals from policy,
verified by a real sshd that trusts the CA (``TrustedUserCAKeys``) and has
no ``authorized_keys`` entry for the agent at all."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from badgeclient import AdminClient
from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon, badgectl_cmd
from tests.ssh.conftest import NOBODY, audit_records
from tests.ssh.test_sshd_login import SSHD, Sshd

pytestmark = pytest.mark.skipif(not Path(SSHD).exists(), reason="needs openssh-server")


@pytest.fixture(scope="module")
def ca_sshd(sshd_daemon: RunningDaemon) -> Iterator[tuple[Sshd, Path]]:
    base = short_tmpdir("bsc")
    base.chmod(0o755)
    ca_pub = sshd_daemon.state / "ssh-ca.pub"  # made by `badged dev` with its CA key
    server = Sshd(base, "ca", "", extra=f"TrustedUserCAKeys {ca_pub}\n")
    yield server, base
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def _cert(d: RunningDaemon, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(badgectl_cmd("ssh", "cert", "demo-agent", "--validity", "5m",
                                       "-o", str(out), "--json", *extra),
                          env=d.env(), capture_output=True, text=True, timeout=30, check=False)


def test_certificate_from_policy_principals_logs_in_where_the_key_alone_does_not(
        sshd_daemon: RunningDaemon, ca_sshd: tuple[Sshd, Path]) -> None:
    server, base = ca_sshd
    bare = server.login(sshd_daemon)  # the agent's key is in no authorized_keys
    assert bare.returncode != 0 and b"Permission denied" in bare.stderr, bare.stderr
    cert = base / "agent-cert.pub"
    issued = _cert(sshd_daemon, cert)
    assert issued.returncode == 0, issued.stderr
    doc = json.loads(issued.stdout)
    assert doc["principals"] == ["root"]  # the dev policy's ssh_principals, not the caller's
    assert doc["valid_before"] - doc["valid_after"] == 300 + 60
    shown = subprocess.run(["ssh-keygen", "-L", "-f", str(cert)], capture_output=True,
                           text=True, check=True).stdout
    assert "spiffe://example.org/agent/demo-agent" in shown and "root" in shown
    ok = server.login(sshd_daemon, None, "-o", f"CertificateFile={cert}")
    assert ok.returncode == 0 and ok.stdout.strip() == b"logged-in", ok.stderr
    signed = [r for r in audit_records(sshd_daemon) if r.get("event") == "ssh.signed"][-1]
    assert signed["ssh"]["certificate"] is True  # type: ignore[index]
    assert signed["ssh"]["user"] == "root"  # type: ignore[index]
    rec = [r for r in audit_records(sshd_daemon)
           if r.get("event") == "ssh.certificate.issued"][-1]
    assert rec["serial"] == doc["serial"] and rec["principals"] == ["root"]
    # Another uid cannot use the certificate: the agent socket still refuses it.
    cert.chmod(0o644)
    stolen = server.login(sshd_daemon, NOBODY, "-o", f"CertificateFile={cert}")
    assert stolen.returncode != 0 and b"logged-in" not in stolen.stdout


def test_principals_come_from_policy_and_other_users_are_refused(
        sshd_daemon: RunningDaemon, ca_sshd: tuple[Sshd, Path]) -> None:
    server, base = ca_sshd
    path = sshd_daemon.state / "policy.toml"
    original = path.read_text()
    assert 'ssh_principals = ["root"]' in original
    path.write_text(original.replace('ssh_principals = ["root"]', 'ssh_principals = ["git"]'))
    try:
        with AdminClient(sshd_daemon.admin) as a:
            assert a.reload_policy() == (True, "")
        cert = base / "git-cert.pub"
        issued = _cert(sshd_daemon, cert)
        assert issued.returncode == 0, issued.stderr
        assert json.loads(issued.stdout)["principals"] == ["git"]
        refused = server.login(sshd_daemon, None, "-o", f"CertificateFile={cert}")
        assert refused.returncode != 0 and b"logged-in" not in refused.stdout
        # No principals at all: no certificate (it would be valid for every user).
        path.write_text(original.replace('ssh_principals = ["root"]\n', ''))
        with AdminClient(sshd_daemon.admin) as a:
            assert a.reload_policy() == (True, "")
        none = _cert(sshd_daemon, base / "none-cert.pub")
        assert none.returncode != 0 and not (base / "none-cert.pub").exists()
        assert "ssh_principals" in none.stdout + none.stderr
    finally:
        path.write_text(original)
        with AdminClient(sshd_daemon.admin) as a:
            assert a.reload_policy() == (True, "")

