"""Throughput of durable audit appends (not a test: run by hand, numbers vary).

    .venv/bin/python tests/audit/bench_audit.py [--records 4000] [--dir /var/tmp]

Measures appends/s for 1 and 16 concurrent appenders with real fsync (group
commit) and with fsync disabled, and a simulated issuance path (ES256 sign on
a thread + audit append) with and without the audit log, which is the
comparison issue 6 asks for ("within 15 % of audit disabled").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "clients")]

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from badged.audit import AuditConfig, AuditLog  # noqa: E402
from badged.audit.log import unsafe_no_fsync  # noqa: E402

EVENT = {"event": "token.issued", "agent": "deploy-bot",
         "caller": {"uid": 1000, "pid": 4242, "exe_sha256": "ab" * 32,
                    "unit": "deploy-bot.service"},
         "request": {"audience": "https://api.example", "scopes": ["read", "write"],
                     "ttl": 300},
         "decision": "allow", "rule": "bind#3", "credential_sha256": "cd" * 32}


async def _appends(log: AuditLog | None, n: int, conc: int, sign: bool,
                   pool: ThreadPoolExecutor, key: ec.EllipticCurvePrivateKey) -> float:
    per = n // conc
    loop = asyncio.get_running_loop()

    async def worker(w: int) -> None:
        for i in range(per):
            if sign:
                await loop.run_in_executor(pool, key.sign, b"payload %d" % i,
                                           ec.ECDSA(hashes.SHA256()))
            if log is not None:
                await log.append({**EVENT, "jti": f"{w}-{i}"})

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(w) for w in range(conc)])
    return per * conc / (time.perf_counter() - t0)


def run(base: Path, n: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pool = ThreadPoolExecutor(max_workers=4)
    rows = []
    for label, fsync, sign, use_log in [
        ("append, fsync", None, False, True),
        ("append, no fsync", unsafe_no_fsync, False, True),
        ("sign+append, fsync", None, True, True),
        ("sign only (audit disabled)", None, True, False),
    ]:
        for conc in (1, 16, 64):
            d = Path(tempfile.mkdtemp(dir=base, prefix="bench-audit-"))
            log = AuditLog.open(AuditConfig(directory=d / "audit", checkpoint_records=None,
                                            checkpoint_seconds=None), fsync=fsync or os.fsync)
            count = n if conc > 1 or fsync else max(n // 8, 200)
            rate = asyncio.run(_appends(log if use_log else None, count, conc, sign, pool, key))
            batches = log.stats.batches
            log.close()
            rows.append((label, conc, rate, batches))
            print(f"{label:28s} conc={conc:3d}  {rate:9.0f}/s  fsyncs={batches}", flush=True)
    pool.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval (s) to try against GIL convoys")
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    run(args.dir, args.records)
