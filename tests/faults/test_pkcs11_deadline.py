"""PKCS#11 call deadlines on a real SoftHSM token.

SoftHSM cannot be made to hang, so the hung call is one the test makes hold
the token (a call into the store that blocks inside its lock, on another
thread -- where the audit checkpoint and the health ping run). What must
hold: an inline signature (the event loop's fast path) waits at most the
deadline and gets UNAVAILABLE, later calls fail at once, ``problem()``
reports it for health, and everything works again when the call returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.errors import KeyExistsError, KeyStoreUnavailableError

ES256 = ec.ECDSA(hashes.SHA256())


@pytest.fixture
def short_deadline(pkcs11_store: Any) -> Iterator[Any]:
    saved = pkcs11_store._guard.timeout
    pkcs11_store._guard.timeout = 0.3
    yield pkcs11_store
    pkcs11_store._guard.timeout = saved


def test_hung_token_call_bounds_inline_signatures(short_deadline: Any) -> None:
    store = short_deadline
    try:
        store.generate("faults/deadline")
    except KeyExistsError:
        pass
    key = store.get("faults/deadline")
    key.sign(b"warm", ES256)
    release, inside = threading.Event(), threading.Event()

    def hung(_session: Any) -> None:
        inside.set()
        release.wait(30)

    t = threading.Thread(target=store._call, args=(hung,))
    t.start()
    assert inside.wait(5)
    try:
        t0 = time.monotonic()
        with pytest.raises(KeyStoreUnavailableError):
            key.sign(b"while hung", ES256)
        assert 0.3 <= time.monotonic() - t0 < 0.8
        time.sleep(0.05)
        assert store.problem() is not None and "not answering" in store.problem()
        t0 = time.monotonic()
        with pytest.raises(KeyStoreUnavailableError):
            key.sign(b"still hung", ES256)
        assert time.monotonic() - t0 < 0.05
    finally:
        release.set()
        t.join(5)
    assert store.problem() is None
    key.sign(b"after", ES256)
