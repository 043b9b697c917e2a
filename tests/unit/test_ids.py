"""Pooled random ids (badged.core.ids): the formats callers rely on, never repeated,
and a forked child never hands out its parent's next bytes."""

from __future__ import annotations

import base64
import os
import re

from badged.core import ids


def test_formats_match_what_they_replace() -> None:
    jti = ids.new_jti()
    assert len(jti) == 24 and re.fullmatch(r"[A-Za-z0-9_-]{24}", jti)
    assert len(base64.urlsafe_b64decode(jti)) == 18
    assert re.fullmatch(r"[0-9a-f]{16}", ids.new_txn())


def test_no_repeats_across_pool_refills() -> None:
    seen = {ids.new_jti() for _ in range(5000)} | {ids.new_txn() for _ in range(5000)}
    assert len(seen) == 10000  # several 4 KiB refills


def test_forked_child_does_not_repeat_the_parent() -> None:
    ids.new_txn()  # the pool is filled
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next id, then leave at once
        os.close(r)
        os.write(w, ids.new_txn().encode())
        os._exit(0)
    os.close(w)
    child_id = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert child_id and child_id != ids.new_txn()
