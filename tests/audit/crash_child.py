"""Child process for the kill -9 test: append forever, print each acknowledged record.

Run as ``python crash_child.py DIR KEY_PEM RUN WORKERS [write]``. Prints
``ready`` once the log is open (after any crash recovery), then ``<seq> <jti>``
for every append that returned -- i.e. every record the daemon would have
answered for. With ``write`` the log runs in durability = "write" with a 1 s
sync delay, so most acknowledged records are not yet fsync'd when the kill
lands (test_durability); otherwise in the default fsync mode (test_crash).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "clients")]

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from badged.audit import AuditConfig, AuditLog  # noqa: E402


class SoftKey:
    """A KeyHandle over a software key: the child cannot share the parent's token."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    @property
    def name(self) -> str:
        return "crash-test"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        return self._key.sign(data, signature_algorithm)


async def main(directory: Path, key_pem: Path, run: str, workers: int, *,
               write_mode: bool = False) -> None:
    key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    config = AuditConfig(directory=directory, rotate_bytes=8192, checkpoint_records=40,
                         checkpoint_seconds=0.2)
    if write_mode:
        config = replace(config, durability="write", sync_delay=1.0)
    log = AuditLog.open(config, signer=SoftKey(key))
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
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                     write_mode=sys.argv[5:] == ["write"]))
