"""Child for the "write"-mode kill -9 test: ``crash_child`` with durability = "write".

Run as ``python durability_child.py DIR KEY_PEM RUN WORKERS``. Prints ``ready``,
then ``<seq> <jti>`` for every append that returned, exactly like
``crash_child.py``; the only difference is the log's durability mode (and a
sync delay long enough that most acknowledged records are not yet fsync'd
when the kill lands).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "clients"), str(ROOT)]

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from badged.audit import AuditConfig, AuditLog  # noqa: E402
from tests.audit.crash_child import SoftKey  # noqa: E402


async def main(directory: Path, key_pem: Path, run: str, workers: int) -> None:
    key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    log = AuditLog.open(
        AuditConfig(directory=directory, rotate_bytes=8192, checkpoint_records=40,
                    checkpoint_seconds=0.2, durability="write", sync_delay=1.0),
        signer=SoftKey(key),
    )
    out = sys.stdout
    out.write("ready\n")
    out.flush()

    async def worker(w: int) -> None:
        i = 0
        while True:
            jti = f"{run}-{w}-{i}"
            receipt = await log.append({"event": "token.issued", "agent": f"a{w}", "jti": jti})
            out.write(f"{receipt.seq} {jti}\n")
            out.flush()
            i += 1

    await asyncio.gather(*[worker(w) for w in range(workers)])


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
