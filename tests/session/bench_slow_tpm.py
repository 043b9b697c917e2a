"""Tokens/s, direct vs session mode, on swtpm slowed to real-TPM speed
(not a test: run by hand, numbers vary).

    .venv/bin/python tests/session/bench_slow_tpm.py [--delay 0.2] [--seconds 10] [--clients 8]

Each mode gets its own swtpm behind tests/session/slow_tpm.py (every TPM
command delayed by ``--delay`` seconds; ~0.2 s is a discrete TPM's p50), a real
``badged --config`` daemon, and ``--clients`` processes fetching tokens for
``--seconds``. Direct mode is bounded by the TPM; session mode is not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "clients")]

from badgeclient import AdminClient  # noqa: E402
from badged.dev import dev_policy  # noqa: E402
from badged.swtpm import SwtpmProcess, provision  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "daemon"), str(ROOT / "clients")]))
CLIENT = """
import sys, time
from badgeclient import WorkloadClient
n, t = 0, time.monotonic()
with WorkloadClient(sys.argv[1], timeout=120) as c:
    while time.monotonic() - t < float(sys.argv[2]):
        c.fetch_token(audience="demo", scopes=["read"])
        n += 1
print(n)
"""


def run(mode: str, delay: float, seconds: float, clients: int) -> float:
    base = Path(tempfile.mkdtemp(prefix="bst", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    swtpm: SwtpmProcess | None = None
    try:
        provisioned = provision(base / "p")
        swtpm = SwtpmProcess(provisioned.state_dir, base / "s", base / "swtpm.log")
        swtpm.start()
        relay = subprocess.Popen([sys.executable, str(ROOT / "tests/session/slow_tpm.py"),
                                  str(base / "r"), str(base / "s"), str(delay)],
                                 stdout=subprocess.PIPE)
        procs.append(relay)
        assert relay.stdout is not None
        relay.stdout.readline()
        state = base / "d"
        state.mkdir(mode=0o755)
        (base / "k").mkdir(mode=0o700)
        (state / "policy.toml").write_text(dev_policy("demo-agent", os.getuid()))
        (state / "badged.toml").write_text(f"""[daemon]
state_dir = "{state}"
workload_socket = "{state}/run/agent.sock"
admin_socket = "{state}/run/admin.sock"
policy_file = "{state}/policy.toml"

[keystore]
backend = "tpm"
tcti = "swtpm:path={base}/r"
key_dir = "{base}/k"
signing_mode = "{mode}"
""")
        with open(base / "badged.log", "wb") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "badged", "--config",
                                       str(state / "badged.toml")],
                                      stdout=subprocess.PIPE, stderr=log, env=ENV)
        procs.append(daemon)
        assert daemon.stdout is not None
        if b"badged ready" not in daemon.stdout.readline():
            raise SystemExit((base / "badged.log").read_text()[-2000:])
        with AdminClient(state / "run" / "admin.sock") as admin:
            admin.create_agent("demo-agent")
        loaders = [subprocess.Popen([sys.executable, "-c", CLIENT, str(state / "run/agent.sock"),
                                     str(seconds)], stdout=subprocess.PIPE, env=ENV)
                   for _ in range(clients)]
        total = sum(int(p.communicate()[0]) for p in loaders)
        return total / seconds
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait()
        if swtpm is not None:
            swtpm.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    for mode in ("direct", "session"):
        rate = run(mode, args.delay, args.seconds, args.clients)
        print(f"{mode:8} {args.delay * 1000:.0f} ms per TPM command: {rate:8.1f} tokens/s "
              f"({args.clients} clients, {args.seconds:g} s)", flush=True)


if __name__ == "__main__":
    main()
