"""``badged dev --backend tpm``: a throwaway swtpm that lives exactly as long
as the daemon, manufactured once per state dir and reused after a restart.

Real processes: the daemon, its swtpm child, badgectl. The swtpm is found by
the socket path in its command line (/proc), never by a broad name match.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from badgeclient import AdminClient, WorkloadClient
from tests.conftest import require_or_skip, short_tmpdir
from tests.e2e.conftest import badged_cmd, start_daemon

pytestmark = [pytest.mark.slow, pytest.mark.tpm]


@pytest.fixture
def base(request: pytest.FixtureRequest) -> Iterator[Path]:
    from badged.swtpm import missing_tooling

    missing = missing_tooling()
    if missing:
        require_or_skip(request.config, missing)
    b = short_tmpdir("bdv")
    yield b
    shutil.rmtree(b, ignore_errors=True)


def _swtpm_pids(state: Path) -> list[int]:
    """swtpm processes serving this state dir (by their --tpmstate argument)."""
    needle = f"dir={state}/private/swtpm/state".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"swtpm" and needle in argv:
            pids.append(int(entry))
    return pids


def _wait_gone(state: Path, deadline_s: float = 10) -> list[int]:
    deadline = time.monotonic() + deadline_s
    while _swtpm_pids(state) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _swtpm_pids(state)


def test_swtpm_lives_as_long_as_the_daemon_and_keeps_its_keys(base: Path) -> None:
    state = base / "s"
    d = start_daemon(state, "--backend", "tpm")
    try:
        assert len(_swtpm_pids(state)) == 1
        assert (state / "private" / "swtpm" / "state" / "tpm2-00.permall").exists()
        with AdminClient(d.admin) as admin:
            kid = admin.get_agent("demo-agent").keys[-1].token_kid
        with WorkloadClient(d.workload) as wl:
            tok = wl.fetch_token(audience="demo", scopes=["read"])
        assert tok.key_id != kid  # session mode by default on tpm
    finally:
        assert d.stop() == 0
    assert _wait_gone(state) == []  # SIGTERM to the daemon stops its swtpm
    # Same state dir again: the same TPM, so the agent's key file still loads.
    d = start_daemon(state, "--backend", "tpm")
    try:
        with AdminClient(d.admin) as admin:
            assert admin.get_agent("demo-agent").keys[-1].token_kid == kid
        with WorkloadClient(d.workload) as wl:
            wl.fetch_token(audience="demo", scopes=["read"])
            assert wl.sign(b"x", context="t").key_id  # the hardware sign key works too
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        # Even a SIGKILLed daemon leaves no swtpm behind (PR_SET_PDEATHSIG).
        assert _wait_gone(state) == []
    finally:
        d.stop()


def test_state_dir_keeps_its_backend(base: Path) -> None:
    state = base / "s"
    d = start_daemon(state, "--backend", "tpm")
    d.stop()
    r = subprocess.run(badged_cmd("dev", "--state-dir", str(state), "--backend", "softhsm"),
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                           [str(Path(__file__).resolve().parents[2] / p) for p in ("daemon", "clients")])))
    assert r.returncode == 2
    assert "created with --backend tpm" in r.stderr


def test_long_state_dir_gets_a_short_swtpm_socket(base: Path) -> None:
    deep = base / ("d" * 60) / "s"
    deep.parent.mkdir()
    d = start_daemon(deep, "--backend", "tpm")
    try:
        pids = _swtpm_pids(deep)
        assert len(pids) == 1
        with open(f"/proc/{pids[0]}/cmdline", "rb") as fh:
            server = next(a for a in fh.read().split(b"\0") if a.startswith(b"type=unixio,path="))
        sock = server.split(b"path=", 1)[1]
        assert len(sock) < 100 and sock.startswith(b"/tmp/badged-swtpm-")
        with WorkloadClient(d.workload) as wl:
            wl.fetch_token(audience="demo", scopes=["read"])
    finally:
        d.stop()
    assert not Path(sock.decode()).parent.exists()  # the temp socket dir is removed
