"""Child for the RLIMIT_FSIZE test: append until the file-size limit bites.

Run as ``python fsize_child.py DIR`` with RLIMIT_FSIZE set and SIGXFSZ ignored
(the parent does both), so writes past the limit fail with EFBIG -- a disk
full that needs no root and no mount. Prints ``<seq>`` per acknowledged
record, then ``refused <n>`` after the log refused n appends in a row.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "clients")]

from badged.audit import AuditConfig, AuditLog  # noqa: E402
from badged.errors import AuditError  # noqa: E402


def main(directory: Path) -> None:
    log = AuditLog.open(AuditConfig(directory=directory, checkpoint_records=None,
                                    checkpoint_seconds=None))
    refused = 0
    for i in range(10_000):
        try:
            r = log.append_sync({"event": "token.issued", "jti": str(i), "pad": "x" * 900})
        except AuditError:
            refused += 1
            if refused == 3:
                break
            continue
        print(r.seq, flush=True)
    print(f"refused {refused}", flush=True)
    log.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
