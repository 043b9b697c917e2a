"""The SSH agent socket on the TPM key store (issue 19 item 6), on a dev swtpm.

``badged dev --backend tpm`` gives the demo agent an ``ssh`` purpose key in
the TPM like its other keys; session-key mode (the token key's software
session key) does not apply: every SSH signature is made by the TPM, on the
signing thread. swtpm is fast; a real TPM takes ~200 ms a signature.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_or_skip, short_tmpdir
from tests.e2e.conftest import RunningDaemon, start_daemon
from tests.ssh.conftest import audit_records, run

pytestmark = [pytest.mark.tpm]


@pytest.fixture(scope="module")
def tpm_daemon(request: pytest.FixtureRequest) -> Iterator[tuple[RunningDaemon, Path]]:
    from badged.swtpm import missing_tooling

    missing = missing_tooling()
    if missing:
        require_or_skip(request.config, missing)
    if shutil.which("ssh-keygen") is None:
        require_or_skip(request.config, "openssh-client not installed")
    base = short_tmpdir("bst")
    d = start_daemon(base / "s", "--backend", "tpm", timeout=60)
    try:
        yield d, base
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_tpm_ssh_key_signs_sshsig_that_verifies(tpm_daemon: tuple[RunningDaemon, Path]) -> None:
    d, work = tpm_daemon
    listed = run(d, "ssh-add", "-L")
    assert listed.returncode == 0, listed.stderr
    pub = listed.stdout.decode().strip()
    assert pub.startswith("ecdsa-sha2-nistp256 ") and len(pub.splitlines()) == 1
    (work / "key.pub").write_text(pub + "\n")
    (work / "msg").write_bytes(b"signed in the TPM\n")
    t0 = time.monotonic()
    signed = run(d, "ssh-keygen", "-Y", "sign", "-n", "git", "-f", "key.pub", "msg", cwd=work)
    took = time.monotonic() - t0
    assert signed.returncode == 0, signed.stderr
    (work / "allowed").write_text(f"tpm {pub}\n")
    verified = run(d, "ssh-keygen", "-Y", "verify", "-f", "allowed", "-I", "tpm", "-n", "git",
                   "-s", "msg.sig", cwd=work, stdin=b"signed in the TPM\n")
    assert verified.returncode == 0, verified.stderr
    rec = [r for r in audit_records(d) if r.get("event") == "ssh.signed"][-1]
    assert rec["kid"] and rec["ssh"]["namespace"] == "git"  # type: ignore[index]
    # The key is a TPM key file of the dev state dir, not a SoftHSM object.
    assert not (d.state / "private" / "softhsm").exists()
    assert took < 30  # swtpm: well under a second; the bound only catches a hang
