"""What issue 13's caller checks cost: the accept-time snapshot and the per-request re-check.

Run: ``.venv/bin/python bench/attest_recheck.py`` (any user; root also sees
other users' processes). Times, in-process and warm, against a live child:

* ``snapshot``: what ``read_peer`` now adds at accept (``exe_identity``:
  stat of /proc/PID/exe and /proc/PID/ns/mnt);
* ``recheck``: what ``ProcessAttestor.attest`` now adds per request on top
  of the stat of /proc/PID/exe it already made -- the (dev, inode) compare
  with the snapshot, the identity-loss latch, the path-verification and
  cgroup-trust cache hits;
* ``attest``: one whole warm ``attest`` call, for scale.

Prints medians of 7 rounds, in µs of CPU per call (process time: on a shared
machine wall time mostly measures the neighbours). A measurement tool, not a test.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "daemon")]

from badged.attest.process import ProcessAttestor  # noqa: E402
from badged.listener.peers import PeerCredentials, exe_identity, proc_start_time  # noqa: E402

N = 20_000


def per_call_us(fn: Callable[[], object], n: int = N) -> float:
    rounds = []
    for _ in range(7):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        rounds.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(rounds)


def main() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        time.sleep(0.2)
        pid = child.pid
        peer = PeerCredentials(pid, os.getuid(), os.getgid(), os.pidfd_open(pid),
                               proc_start_time(pid), "workload", exe_identity(pid))
        attestor = ProcessAttestor()
        attrs = attestor.attest(peer)  # warm every cache
        snap = peer.exe
        assert snap is not None and attrs.exe is not None
        st = os.stat(f"/proc/{pid}/exe")

        def recheck() -> bool:
            # Exactly the work attest() gained per request (the stat above
            # it already did before issue 13).
            return (peer.lost.reason is None and snap.same_file(st.st_dev, st.st_ino)
                    and attestor._path_is(attrs.exe or "", st.st_dev, st.st_ino)
                    and attestor._cgroups.names(attrs.cgroup) is not None)

        snapshot = per_call_us(lambda: exe_identity(pid))
        check = per_call_us(recheck)
        whole = per_call_us(lambda: attestor.attest(peer), n=5_000)
        print(f"snapshot at accept: {snapshot:.2f} µs/connection")
        print(f"re-check per request: {check:.2f} µs/call")
        print(f"whole warm attest(): {whole:.2f} µs/call")
    finally:
        child.kill()
        child.wait()


if __name__ == "__main__":
    main()
