"""Checkpoints: signed by a real token key, on schedule, at close; forgeries fail."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from badged.audit import key_id, verify
from badged.errors import AuditError, KeyStoreUnavailableError
from badged.keystore.port import KeyHandle
from tests.audit.helpers import (
    FakeClock,
    all_records,
    build_log,
    find_line,
    log_lines,
    open_log,
    rechain,
    reseal,
    rewrite,
)


def _checkpoints(directory: Path) -> list[dict[str, object]]:
    return [r for r in all_records(directory) if r["kind"] == "checkpoint"]


@pytest.mark.softhsm
def test_checkpoints_are_signed_by_the_token_key(audit_dir: Path, hsm_key: KeyHandle) -> None:
    build_log(audit_dir, hsm_key, n=30, every=10)
    cps = _checkpoints(audit_dir)
    # after events 10, 20, 30; close() adds none because the head is already sealed
    assert [c["head_seq"] for c in cps] == [10, 21, 32]
    pub = hsm_key.public_key()
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    for c in cps:
        assert c["key"] == key_id(pub)
        assert c["key"] == __import__("hashlib").sha256(der).hexdigest()
        # Re-derive the signed statement here rather than trusting the module.
        stmt = {k: c[k] for k in ("head", "head_seq", "key", "reason", "sealed_at")}
        # The span hash (docs/audit.md, "Span hashes") is signed too.
        stmt.update({k: c[k] for k in ("span_from", "span_sha256") if k in c})
        assert "span_sha256" in c
        data = b"badged-audit-checkpoint-v1\n" + json.dumps(
            stmt, sort_keys=True, separators=(",", ":")).encode()
        pub.verify(base64.b64decode(str(c["sig"])), data, ec.ECDSA(hashes.SHA256()))
    report = verify(audit_dir, pub, strict=True)
    assert report.ok, report.first_bad
    assert report.signatures_checked and report.checkpoints == 3 and report.unsealed == 0


@pytest.mark.softhsm
def test_rewritten_chain_passes_hash_check_but_fails_token_signature(
        audit_dir: Path, hsm_key: KeyHandle) -> None:
    build_log(audit_dir, hsm_key, n=30, every=10)
    path, idx = find_line(audit_dir, 7)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[idx] = lines[idx].replace(b'"agent-1"', b'"agent-2"')
    rewrite(path, lines)
    rechain(audit_dir, fix_checkpoint_heads=True)
    # Anyone can recompute SHA-256: without the key the forgery looks fine...
    assert verify(audit_dir).ok
    # ...but the token's signature over the first checkpoint after it does not.
    report = verify(audit_dir, hsm_key.public_key())
    assert not report.ok and report.first_bad is not None
    assert report.first_bad.code == "checkpoint_bad_signature"
    assert report.first_bad.seq == 11 and report.first_bad.line == 11


def test_foreign_key_is_reported(audit_dir: Path, mem_key: KeyHandle) -> None:
    from badged.keystore.memory import MemoryKeyStore

    build_log(audit_dir, mem_key, n=12, every=5)
    other = MemoryKeyStore().generate("other")
    report = verify(audit_dir, other.public_key())
    assert report.first_bad is not None and report.first_bad.code == "checkpoint_wrong_key"
    assert report.first_bad.seq == 6


def test_forged_signature_bytes_are_reported(audit_dir: Path, mem_key: KeyHandle) -> None:
    build_log(audit_dir, mem_key, n=12, every=5)
    path, idx = find_line(audit_dir, 6)
    lines = path.read_bytes().splitlines(keepends=True)
    rec = json.loads(lines[idx])
    sig = bytearray(base64.b64decode(rec["sig"]))
    sig[-1] ^= 1
    rec["sig"] = base64.b64encode(bytes(sig)).decode()
    lines[idx] = reseal(rec)
    rewrite(path, lines)
    rechain(audit_dir)
    report = verify(audit_dir, mem_key.public_key())
    assert report.first_bad is not None
    assert (report.first_bad.code, report.first_bad.seq) == ("checkpoint_bad_signature", 6)


def test_checkpoint_every_n_records_and_at_close(audit_dir: Path, mem_key: KeyHandle) -> None:
    log = open_log(audit_dir, signer=mem_key, checkpoint_records=5)

    async def go() -> None:
        for i in range(23):
            await log.append({"event": "token.issued", "i": i})
        await log.aclose()

    asyncio.run(go())
    cps = _checkpoints(audit_dir)
    assert len(cps) >= 4
    assert [c["reason"] for c in cps][-1] == "close"
    assert all(c["reason"] == "interval" for c in cps[:-1])
    report = verify(audit_dir, mem_key.public_key(), strict=True)
    assert report.ok and report.unsealed == 0


def test_checkpoint_when_interval_seconds_elapsed_on_the_injected_clock(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    clock = FakeClock(tick=0.0)
    log = open_log(audit_dir, signer=mem_key, clock=clock, checkpoint_seconds=60)

    async def go() -> None:
        await log.append({"event": "a"})
        assert log.stats.checkpoints == 0  # not yet due
        clock.now += 61
        await log.append({"event": "b"})  # due: seals seq 2 in the background
        await log.append({"event": "c"})
        await log.aclose()  # waits for the running checkpoint, then seals the rest

    asyncio.run(go())
    reasons = [(c["reason"], c["head_seq"]) for c in _checkpoints(audit_dir)]
    assert reasons[0] == ("interval", 2)
    assert [r for r, _ in reasons].count("interval") == 1
    assert verify(audit_dir, mem_key.public_key(), strict=True).ok


def test_quiet_tail_is_sealed_by_the_timer(audit_dir: Path, mem_key: KeyHandle) -> None:
    log = open_log(audit_dir, signer=mem_key, checkpoint_seconds=0.05, clock=FakeClock(tick=0))

    async def go() -> None:
        await log.append({"event": "a"})
        for _ in range(1000):  # bounded wait for the timer; no assertion on time
            if log.stats.checkpoints:
                break
            await asyncio.sleep(0.01)
        assert log.stats.checkpoints == 1
        await log.aclose()

    asyncio.run(go())
    assert _checkpoints(audit_dir)[0]["head_seq"] == 1


class _BrokenSigner:
    """A token that went away: signing fails, public key still known."""

    def __init__(self, real: KeyHandle) -> None:
        self._real = real

    @property
    def name(self) -> str:
        return "broken"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._real.public_key()

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        raise KeyStoreUnavailableError("token removed", backend="test")


def test_signing_failure_does_not_stop_appends(audit_dir: Path, mem_key: KeyHandle) -> None:
    log = open_log(audit_dir, signer=_BrokenSigner(mem_key), checkpoint_records=2)

    async def go() -> None:
        for i in range(6):
            await log.append({"event": "a", "i": i})
        await log.aclose()

    asyncio.run(go())
    report = verify(audit_dir, mem_key.public_key())
    assert report.ok and report.checkpoints == 0 and report.unsealed == 6
    assert not verify(audit_dir, mem_key.public_key(), strict=True).ok


def test_reopen_after_clean_close_adds_no_checkpoint(audit_dir: Path, mem_key: KeyHandle) -> None:
    build_log(audit_dir, mem_key, n=3, every=100)
    n = len(all_records(audit_dir))
    open_log(audit_dir, signer=mem_key).close()
    assert len(all_records(audit_dir)) == n
    assert len(log_lines(audit_dir)) == 1


class _GatedSigner:
    """Signs only when the test says so, to interleave a write failure."""

    def __init__(self, real: KeyHandle) -> None:
        self._real = real
        self.gate = threading.Event()

    @property
    def name(self) -> str:
        return "gated"

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._real.public_key()

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        self.gate.wait(30)  # deadlock guard only
        return self._real.sign(data, signature_algorithm)


def test_checkpoint_over_a_record_lost_to_a_write_failure_is_dropped(
        audit_dir: Path, mem_key: KeyHandle) -> None:
    signer = _GatedSigner(mem_key)
    write_gate = threading.Event()
    state = {"fail": False}

    def write(fd: int, data: bytes) -> int:
        if state["fail"]:
            write_gate.wait(30)
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    log = open_log(audit_dir, signer=signer, write=write)

    async def go() -> None:
        await log.append({"event": "a"})
        state["fail"] = True
        b = asyncio.create_task(log.append({"event": "b"}))  # seq 2, stuck in write
        while log.stats.assigned < 2:
            await asyncio.sleep(0)
        cp = asyncio.create_task(log.checkpoint())  # captures head = b, then waits to sign
        await asyncio.sleep(0)
        write_gate.set()  # b's write fails: the chain rewinds to seq 1
        with pytest.raises(AuditError):
            await b
        state["fail"] = False
        assert (await log.append({"event": "c"})).seq == 2  # a different record 2
        signer.gate.set()
        with pytest.raises(AuditError, match="rewound"):
            await cp
        await log.aclose()

    asyncio.run(go())
    report = verify(audit_dir, mem_key.public_key(), strict=True)
    assert report.ok, report.first_bad
    assert [r["event"] for r in all_records(audit_dir)] == ["a", "c", "audit.checkpoint"]
