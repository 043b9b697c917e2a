"""Offline verification of an audit directory: chain, checkpoints, signatures.

Usage::

    report = verify(Path("/var/lib/badged/audit"), device_public_key)
    if not report.ok:
        print(report.first_bad)   # audit-...jsonl:17: seq 17: hash does not match ...

Reads only; needs no daemon, token or lock, so it runs on a copy of the
directory on another machine. It stops at the *first* bad record: everything
after a break is unanchored, so later findings would only be noise.

What each finding means (``BadRecord.code``):

* ``malformed`` / ``hash_mismatch`` / ``not_canonical``: the line itself was
  edited (or is garbage);
* ``seq_gap``: records are missing before this one (deleted, or moved later);
  a log that starts after seq 1 passes only if an ``audit.pruned`` record
  in what remains names the removed file's last seq and hash (retention);
* ``seq_order``: this record came earlier in the chain (reordered, duplicated);
* ``chain_broken``: ``prev`` does not match the record before: a record was
  replaced by another with a valid hash of its own;
* ``checkpoint_head_mismatch``: the signed head does not match the chain: the
  chain before it was rewritten consistently (only signatures catch this);
* ``checkpoint_bad_signature`` / ``checkpoint_wrong_key``: forged or foreign;
* ``torn``: an incomplete line inside the log (at the very end it is only a
  warning, ``torn_tail``: a crash the daemon has not yet sealed);
* ``unsealed_tail`` (``strict`` only): records after the last checkpoint --
  their truncation would be undetectable;
* ``sealed_cut``: a crash recovery's cut file holds records a checkpoint had
  sealed, or an operator moved sealed records aside (``badged recover
  --audit-move-aside``): history was lost, and stays reported;
* ``cut_missing`` / ``cut_mismatch``: a recovery's cut-off bytes are gone or
  changed, so whether they were sealed cannot be checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.audit import files
from badged.audit.record import (
    CLOCK_BACKWARDS,
    GENESIS,
    KIND_CHECKPOINT,
    KIND_RECOVERY,
    RecordError,
    checkpoint_statement,
    decode_sig,
    key_id,
    parse_line,
)
from badged.audit.retention import PRUNED_EVENT
from badged.errors import ConfigError

_logger = logging.getLogger(__name__)

_ES256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class BadRecord:
    """Where verification found a problem, precise enough to open an editor at."""

    file: str
    line: int
    seq: int | None
    code: str
    reason: str

    def __str__(self) -> str:
        seq = f"seq {self.seq}" if self.seq is not None else "seq ?"
        return f"{self.file}:{self.line}: {seq}: {self.reason} [{self.code}]"


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`. ``ok`` is the one bit a script should test."""

    ok: bool = True
    records: int = 0
    files: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str | None = None
    checkpoints: int = 0
    signatures_checked: bool = False
    sealed_seq: int = 0
    unsealed: int = 0
    first_bad: BadRecord | None = None
    torn_tail: BadRecord | None = None
    recoveries: list[BadRecord] = field(default_factory=list)
    clock_steps_back: int = 0
    unchecked_checkpoints: int = 0
    # Retention: the log starts after seq 1 and the audit.pruned record (its
    # seq) that vouches for the missing prefix; every audit.pruned seen.
    pruned_to: int = 0
    pruned_by: int | None = None
    prunes: int = 0

    def summary(self) -> str:
        """Multi-line human summary (the CLI prints this)."""
        out = []
        if self.first_bad is not None:
            out.append(f"FAILED at {self.first_bad}")
        else:
            out.append("OK")
        span = (f"seq {self.first_seq}..{self.last_seq}" if self.first_seq is not None
                else "no records")
        out.append(f"{self.records} records ({span}) in {self.files} file(s)")
        sig = "signatures verified" if self.signatures_checked else (
            "signatures NOT checked (no public key given)")
        out.append(f"{self.checkpoints} checkpoint(s), {sig}; sealed up to seq {self.sealed_seq}")
        if self.unsealed:
            out.append(f"unsealed tail: {self.unsealed} record(s) after the last checkpoint "
                       "(truncating them would not be detectable)")
        if self.torn_tail is not None:
            out.append(f"torn tail (crash not yet recovered?): {self.torn_tail}")
        for rec in self.recoveries:
            out.append(f"crash recovery: {rec}")
        if self.clock_steps_back:
            out.append(f"clock went backwards {self.clock_steps_back} time(s)")
        if self.pruned_to:
            out.append(f"seq 1..{self.pruned_to} removed by retention (audit.pruned record "
                       f"seq {self.pruned_by}); chain verified from its recorded hash")
        if self.prunes:
            out.append(f"{self.prunes} audit.pruned record(s)")
        if self.unchecked_checkpoints:
            out.append(f"{self.unchecked_checkpoints} checkpoint head(s) outside the "
                       "verified range (not checked)")
        return "\n".join(out)


class _Stop(Exception):
    pass


class _Verifier:
    def __init__(self, public_key: ec.EllipticCurvePublicKey | None, from_seq: int | None,
                 strict: bool, window: int) -> None:
        self.public_key = public_key
        self.kid = key_id(public_key) if public_key is not None else None
        self.from_seq = from_seq
        self.strict = strict
        self.window = window
        self.report = VerifyReport(signatures_checked=public_key is not None)
        # Anchor: genesis for a full check; the first record's own prev with --from.
        self.prev_seq: int | None = 0 if from_seq is None else None
        self.prev_hash = GENESIS
        self.recent: dict[int, str] = {}
        self.recent_order: deque[int] = deque()
        self.unsealed: deque[BadRecord] = deque()  # locations of non-checkpoint records
        # A log whose first record is not seq 1 (retention removed the oldest
        # files): anchored on its own prev, provisionally, until an
        # audit.pruned record names exactly that seq and hash.
        self.pending_prune: tuple[int, str, BadRecord] | None = None

    def fail(self, bad: BadRecord) -> NoReturn:
        self.report.ok = False
        self.report.first_bad = bad
        raise _Stop

    def line(self, line: files.Line, is_last: bool) -> None:
        name = line.path.name
        if self.prev_seq is None and line.complete:
            # --from: records before the start are not checked at all, so
            # damage there must not stop us finding the start.
            peek = _peek_seq(line.data)
            if peek is not None and self.from_seq is not None and peek < self.from_seq:
                return
        if not line.complete:
            bad = BadRecord(name, line.lineno, None, "torn",
                            f"incomplete record ({len(line.data)} bytes, no newline)")
            if is_last and not self.strict:
                self.report.torn_tail = bad
                return
            self.fail(bad)
        try:
            rec = parse_line(line.data)
        except RecordError as exc:
            self.fail(BadRecord(name, line.lineno, _peek_seq(line.data), exc.code, exc.message))
        seq: int = rec["seq"]
        if self.prev_seq is None:  # --from: find the start, trust its prev
            assert self.from_seq is not None
            if seq < self.from_seq:
                return
            if seq > self.from_seq:
                self.fail(BadRecord(name, line.lineno, seq, "seq_gap",
                                    f"log has no seq {self.from_seq}; first found is {seq}"))
            self.prev_seq, self.prev_hash = seq - 1, rec["prev"]
        where = (name, line.lineno, seq)
        expected = self.prev_seq + 1
        if seq > expected and expected == 1 and self.from_seq is None:
            self.pending_prune = (seq - 1, rec["prev"], BadRecord(
                *where, "seq_gap", f"log starts at seq {seq} but no audit.pruned record "
                f"vouches for seq 1..{seq - 1} ending in that prev: records deleted "
                "(use --from to check only what is left)"))
            self.prev_seq, self.prev_hash = seq - 1, rec["prev"]
            expected = seq
        if seq > expected:
            what = ("log does not start at seq 1 (earlier files removed? use --from)"
                    if expected == 1 else f"expected seq {expected}, found {seq}: "
                    "record(s) deleted or moved")
            self.fail(BadRecord(*where, "seq_gap", what))
        if seq < expected:
            self.fail(BadRecord(*where, "seq_order", f"expected seq {expected}, found {seq}: "
                                "record(s) reordered or duplicated"))
        if rec["prev"] != self.prev_hash:
            self.fail(BadRecord(*where, "chain_broken",
                                f"prev does not match the hash of seq {seq - 1}: "
                                "record replaced or chain spliced"))
        r = self.report
        if rec["kind"] == KIND_CHECKPOINT:
            self.checkpoint(rec, where)
        else:
            self.unsealed.append(BadRecord(*where, "unsealed_tail",
                                           "record after the last valid checkpoint"))
        if rec["kind"] == KIND_RECOVERY:
            r.recoveries.append(BadRecord(*where, "recovery", _recovery_text(rec)))
            self.check_cut(rec, where, line.path.parent)
        if rec.get("event") == PRUNED_EVENT and rec["kind"] != KIND_CHECKPOINT:
            self.pruned(rec, seq)
        if CLOCK_BACKWARDS in rec:
            r.clock_steps_back += 1
        self.remember(seq, rec["hash"])
        self.prev_seq, self.prev_hash = seq, rec["hash"]
        r.records += 1
        if r.first_seq is None:
            r.first_seq = seq
        r.last_seq, r.head = seq, rec["hash"]

    def checkpoint(self, rec: dict[str, object], where: tuple[str, int, int]) -> None:
        head_seq, head, seq = rec.get("head_seq"), rec.get("head"), where[2]
        if not isinstance(head_seq, int) or not isinstance(head, str) or head_seq >= seq:
            self.fail(BadRecord(*where, "malformed", "checkpoint without a valid head"))
        assert isinstance(head_seq, int)
        known = self.recent.get(head_seq)
        if known is None:
            self.report.unchecked_checkpoints += 1
        elif known != head:
            self.fail(BadRecord(*where, "checkpoint_head_mismatch",
                                f"signed head of seq {head_seq} does not match the chain: "
                                f"records up to seq {head_seq} were rewritten"))
        if self.public_key is not None:
            if rec.get("key") != self.kid:
                self.fail(BadRecord(*where, "checkpoint_wrong_key",
                                    "checkpoint signed by a different key"))
            try:
                sig = decode_sig(str(rec.get("sig", "")))
                self.public_key.verify(sig, checkpoint_statement(rec), _ES256)
            except (InvalidSignature, ValueError, KeyError):
                self.fail(BadRecord(*where, "checkpoint_bad_signature",
                                    "checkpoint signature does not verify"))
        self.report.checkpoints += 1
        if known is not None and head_seq > self.report.sealed_seq:
            self.report.sealed_seq = head_seq
            while self.unsealed and (self.unsealed[0].seq or 0) <= head_seq:
                self.unsealed.popleft()

    def pruned(self, rec: Mapping[str, object], seq: int) -> None:
        """An ``audit.pruned`` record: does it vouch for the missing prefix?"""
        self.report.prunes += 1
        pending = self.pending_prune
        if (pending is not None and rec.get("last_seq") == pending[0]
                and rec.get("last_hash") == pending[1]):
            self.report.pruned_to, self.report.pruned_by = pending[0], seq
            self.pending_prune = None

    def check_cut(self, rec: dict[str, object], where: tuple[str, int, int],
                  directory: Path) -> None:
        """A recovery may only have cut what no checkpoint had sealed.

        Recovery cuts a torn tail after a crash; records a signed checkpoint
        had covered were acknowledged history, so a cut that holds them (or
        an operator's explicit move-aside, marked ``sealed``) is lost history
        and fails verification for good. The cut bytes are the evidence: if
        they are gone or changed, nobody can tell, which fails too.
        """
        if rec.get("sealed") is True:
            self.fail(BadRecord(*where, "sealed_cut",
                                f"records from seq {where[2]} sealed by checkpoint seq "
                                f"{rec.get('sealed_by')} were moved aside by the operator "
                                f"to {rec.get('moved_to')} (tampering found at start-up)"))
        moved = rec.get("moved_to")
        if not isinstance(moved, str) or "/" in moved or not moved:
            return
        try:
            data = (directory / moved).read_bytes()
        except OSError:
            self.fail(BadRecord(*where, "cut_missing",
                                f"the cut-off bytes of this recovery ({moved}) are gone: "
                                "cannot tell whether sealed records were cut"))
        if hashlib.sha256(data).hexdigest() != rec.get("cut_sha256"):
            self.fail(BadRecord(*where, "cut_mismatch",
                                f"{moved} does not hold the bytes this recovery cut"))
        sealer = sealed_in_cut(data, where[2], self.public_key)
        if sealer is not None:
            self.fail(BadRecord(*where, "sealed_cut",
                                f"{moved} holds records from seq {where[2]} that checkpoint "
                                f"seq {sealer} had sealed: sealed history was cut"))

    def remember(self, seq: int, digest: str) -> None:
        # Checkpoints seal recent heads (seconds old), so a bounded window of
        # seq -> hash is enough and keeps memory flat on huge logs.
        self.recent[seq] = digest
        self.recent_order.append(seq)
        if len(self.recent_order) > self.window:
            del self.recent[self.recent_order.popleft()]

    def finish(self) -> None:
        if self.pending_prune is not None:
            self.fail(self.pending_prune[2])
        self.report.unsealed = len(self.unsealed)
        if self.strict and self.unsealed:
            self.fail(self.unsealed[0])


def verify(
    directory: Path | str,
    public_key: ec.EllipticCurvePublicKey | None = None,
    *,
    from_seq: int | None = None,
    strict: bool = False,
    window: int = 200_000,
) -> VerifyReport:
    """Check every record from ``from_seq`` (default: seq 1) to the end.

    Without ``public_key`` only the hash chain is checked -- which anyone can
    recompute after an edit, so that proves integrity against accidents, not
    against an attacker. ``strict`` also fails on an unsealed tail and a torn
    last line. ``window`` bounds memory: a checkpoint whose head is more than
    ``window`` records back cannot be matched and is counted as unchecked
    (checkpoints normally seal heads a few thousand records back at most).
    Raises :class:`ConfigError` if ``directory`` is not a directory.
    """
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError("audit directory not found", path=str(path))
    paths = files.list_files(path)
    if from_seq is not None:
        # skip whole files that end before from_seq (names carry the first seq)
        start = 0
        for i, p in enumerate(paths):
            first = files.name_seq(p)
            if first is not None and first <= from_seq:
                start = i
        paths = paths[start:]
    v = _Verifier(public_key, from_seq, strict, window)
    v.report.files = len(paths)
    try:
        for i, p in enumerate(paths):
            for line in files.iter_lines(p):
                v.line(line, is_last=i == len(paths) - 1)
        if from_seq is not None and v.prev_seq is None:
            v.fail(BadRecord(paths[-1].name if paths else str(path), 0, None, "seq_gap",
                             f"log has no seq {from_seq}"))
        v.finish()
    except _Stop:
        pass
    report = v.report
    if report.first_bad is not None:
        _logger.info("audit verify failed: %s", report.first_bad)
    return report


def checkpoint_seals(rec: Mapping[str, object], seq: int,
                     public_key: ec.EllipticCurvePublicKey | None) -> bool:
    """Whether ``rec`` is a checkpoint that sealed the record numbered ``seq``.

    With a public key the signature must verify (a forged checkpoint proves
    nothing); without one every well-formed checkpoint counts -- the
    cautious answer, since the question is "may this be cut?".
    """
    if rec.get("kind") != KIND_CHECKPOINT:
        return False
    head_seq = rec.get("head_seq")
    if not isinstance(head_seq, int) or head_seq < seq:
        return False
    if public_key is None:
        return True
    try:
        public_key.verify(decode_sig(str(rec.get("sig", ""))), checkpoint_statement(rec), _ES256)
    except (InvalidSignature, ValueError, KeyError):
        return False
    return True


def sealed_in_cut(data: bytes, first_seq: int,
                  public_key: ec.EllipticCurvePublicKey | None) -> int | None:
    """Seq of a checkpoint among cut-off bytes that had sealed ``first_seq`` or later."""
    for raw in data.split(b"\n"):
        try:
            rec = parse_line(raw)
        except RecordError:
            continue
        if checkpoint_seals(rec, first_seq, public_key):
            seq = rec.get("seq")
            return seq if isinstance(seq, int) else 0
    return None


def _peek_seq(data: bytes) -> int | None:
    """Best-effort seq of a bad line, for the message only (never trusted)."""
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if isinstance(seq, int) else None


def _recovery_text(rec: dict[str, object]) -> str:
    return (f"{rec.get('reason')}: cut {rec.get('cut_bytes')} bytes at line {rec.get('line')} "
            f"of {rec.get('file')} (saved as {rec.get('moved_to')})")
