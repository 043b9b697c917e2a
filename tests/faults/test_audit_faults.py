"""The audit directory on a file system that fills up or turns read-only.

Real file systems, mounted for the test (needs root): a small tmpfs filled to
the last byte, and a loop-mounted ext4 (``errors=remount-ro``) forced into
its read-only error state with ``/sys/fs/ext4/<dev>/trigger_fs_error`` --
the way a disk error turns a real file system read-only. (``mount -o
remount,ro`` cannot be used: the kernel refuses it with EBUSY while the
daemon holds the audit file open for writing.)

What must hold (issue 15, item 4): health is NOT_SERVING within about a
second, with the reason on the admin socket, and SERVING again once the
cause goes away where the OS allows it (space freed; a read-only error state
needs a remount, and the poisoned log a restart).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from badgeclient import BadgeError, WorkloadClient
from tests.conftest import require_or_skip, short_tmpdir
from tests.e2e.conftest import RunningDaemon, badgectl_cmd
from tests.faults.probes import NOT_SERVING, SERVING, Health
from tests.session.test_session_e2e import _create_agent, _start_config_daemon, _write_config


def _mount(request: pytest.FixtureRequest, *args: str) -> None:
    if os.geteuid() != 0:
        require_or_skip(request.config, "mounting a test file system needs root")
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        require_or_skip(request.config, f"cannot mount a test file system: {proc.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def _daemon_with_audit_dir(request: pytest.FixtureRequest, base: Path,
                           audit: Path) -> Iterator[RunningDaemon]:
    from badged.softhsm import provision

    if shutil.which("softhsm2-util") is None:
        require_or_skip(request.config, "softhsm2-util not installed")
    state = base / "s"
    state.mkdir(mode=0o755)
    token = provision(base / "hsm", label="badged-audit-fault")
    cfg = _write_config(state, keystore=f'backend = "pkcs11"\nuri = "{token.uri()}"\n'
                                        f'module_path = "{token.module_path}"\n')
    cfg.write_text(cfg.read_text() + f'\n[audit]\ndir = "{audit}"\n')
    d = _start_config_daemon(state, cfg, extra_env={"SOFTHSM2_CONF": str(token.conf_path)})
    try:
        _create_agent(d)
        yield d
    finally:
        d.stop(timeout=10)


def _badgectl_health(d: RunningDaemon) -> subprocess.CompletedProcess[str]:
    """``badgectl health`` as an operator runs it (exit 1 while not serving)."""
    return subprocess.run(badgectl_cmd("health", "--admin-socket", str(d.admin)), env=d.env(),
                          capture_output=True, text=True, timeout=30, check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:  # unbuffered: a short write fills the last bytes
                fh.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_full_audit_disk_turns_health_and_recovers(request: pytest.FixtureRequest) -> None:
    base = short_tmpdir("bafull")
    audit = base / "audit"
    audit.mkdir()
    _mount(request, "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(audit))
    try:
        with _daemon_with_audit_dir(request, base, audit) as d:
            health, admin = Health(d.workload), Health(d.admin)
            with WorkloadClient(d.workload, timeout=10) as wl:
                wl.fetch_token(audience="demo", scopes=["read"])
                assert health.status() == SERVING
                filler = _fill(audit)
                assert health.wait_for(NOT_SERVING, within=1.5) < 1.5
                reasons = admin.detail()["badged.v1.WorkloadService"]["reasons"]
                assert any("audit disk full" in r for r in reasons), reasons
                assert health.detail() == {}  # reasons for operators only (admin socket)
                cli = _badgectl_health(d)
                assert cli.returncode == 1 and "audit disk full" in cli.stdout, cli
                # The file's last page may still take a record or two; then
                # nothing more is issued (unaudited credentials never are).
                with pytest.raises(BadgeError):
                    for _ in range(20):
                        wl.fetch_token(audience="demo", scopes=["read"])
                filler.unlink()
                assert health.wait_for(SERVING, within=1.5) < 1.5
                wl.fetch_token(audience="demo", scopes=["read"])
                cli = _badgectl_health(d)
                assert cli.returncode == 0 and "NOT_SERVING" not in cli.stdout, cli
            health.close()
            admin.close()
    finally:
        _umount(audit)
        shutil.rmtree(base, ignore_errors=True)


def test_audit_fs_turned_read_only_turns_health(request: pytest.FixtureRequest) -> None:
    base = short_tmpdir("baro")
    audit, image = base / "audit", base / "fs.img"
    audit.mkdir()
    if shutil.which("mkfs.ext4") is None:
        require_or_skip(request.config, "mkfs.ext4 not installed (e2fsprogs)")
    with open(image, "wb") as fh:
        fh.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    _mount(request, "-o", "loop,errors=remount-ro", str(image), str(audit))
    try:
        device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(audit)], check=True,
                                capture_output=True, text=True).stdout.strip()
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            require_or_skip(request.config, f"{trigger} missing: cannot force the error state")
        with _daemon_with_audit_dir(request, base, audit) as d:
            health, admin = Health(d.workload), Health(d.admin)
            with WorkloadClient(d.workload, timeout=10) as wl:
                wl.fetch_token(audience="demo", scopes=["read"])
                assert health.status() == SERVING
                trigger.write_text("badged test: disk error\n")
                with pytest.raises(BadgeError):  # the append fails: nothing issued
                    wl.fetch_token(audience="demo", scopes=["read"])
                assert health.wait_for(NOT_SERVING, within=1.0) < 1.0
                reasons = admin.detail()[""]["reasons"]
                assert any(r.startswith("audit:") for r in reasons), reasons
                with pytest.raises(BadgeError):
                    wl.fetch_token(audience="demo", scopes=["read"])
                assert health.status() == NOT_SERVING  # no recovery without a restart
            health.close()
            admin.close()
    finally:
        _umount(audit)
        shutil.rmtree(base, ignore_errors=True)
