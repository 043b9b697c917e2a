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
* ``checkpoint_span_mismatch``: a checkpoint's signed span hash (the SHA-256
  of the exact bytes of lines ``span_from``..``head_seq``) does not match
  those lines as they are in the log;
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

import contextlib
import gc
import hashlib
import json
import logging
import os
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import accumulate, repeat
from operator import attrgetter, itemgetter, methodcaller, sub
from pathlib import Path
from typing import Any, NoReturn

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from badged.audit import files
from badged.audit.record import (
    CLOCK_BACKWARDS,
    GENESIS,
    KIND_CHECKPOINT,
    KIND_EVENT,
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



# -- the fast path ----------------------------------------------------------------
#
# The record-by-record path (_Verifier.line) costs ~40 µs a record in Python:
# a stdlib JSON parse, two canonical re-encodes and a hash, each a Python
# call. That is ~1 % of a disk's sequential read rate (issue 22). The fast
# path checks a whole chunk of a file with a handful of C-level calls
# (orjson, hashlib, list and bytes operations), and files in parallel
# processes. It only ever *confirms*: a file it cannot show clean, for
# whatever reason, goes through the record-by-record path, which reports
# exactly what it always did. So a finding never depends on the fast path;
# only the time to find that a file is clean does.

PARALLEL_MIN_BYTES = 32 * 1024 * 1024
"""Below this much log, one process: starting workers would cost more than it saves."""
_CHUNK = 1024 * 1024  # whole lines per check: 1 MiB measured ~10 % faster than 4 (cache)
_SORTED = orjson.OPT_SORT_KEYS
_FAST_KINDS = frozenset({KIND_EVENT, KIND_CHECKPOINT})
_COLUMNS = itemgetter("seq", "prev", "kind", "time")
_HASH_PAIR = len(',"hash":""') + 64
"""Bytes the top-level ``"hash"`` member adds to a canonical record (with its comma)."""
# Floats are where orjson's spelling and the stdlib encoder's (which defines
# the canonical form) differ: orjson writes 1e-05 as 0.00001, 1e+16 as 1e16
# and 1e-09 as 1e-9; they agree wherever the stdlib writes no exponent. A
# chunk with any such spelling takes the slow path: "0.0000" finds the
# first kind; the others have an "e" right after the digits of a number,
# which, with digits deleted and the characters around numbers (: [ . - }
# ]) made commas, reads ",e," (a hex digest "...3e45..." stays letters;
# true/false become "ue,"/"se,"). A string that happens to read so only
# costs the slow path. tests/audit/test_verify_fast.py checks this against
# json on floats of every magnitude.
_NUMBER_EDGES = bytes.maketrans(b":[.-}]", b",,,,,,")
_DIGITS = b"0123456789"


# The orjson of the lock writes large floats as json does (1e+16), so there
# only a negative exponent ("e-") or "0.0000" can differ, and a chunk with
# neither needs no translation; another orjson gets the full test always.
_POSITIVE_EXPONENTS_AGREE = (orjson.dumps([1e16, 1.5e300, -2.5e17])
                             == json.dumps([1e16, 1.5e300, -2.5e17], separators=(",", ":"))
                             .encode())


def _orjson_spelling_may_differ(data: bytes) -> bool:
    """True if ``data`` may hold a float orjson and the canonical encoder spell differently."""
    if b"0.0000" in data:
        return True
    if _POSITIVE_EXPONENTS_AGREE and b"e-" not in data:
        return False
    return b",e," in data.translate(_NUMBER_EDGES, _DIGITS)


_HEX64 = re.compile(r"[0-9a-f]{64}")
_TZINFO = attrgetter("tzinfo")
_TO_UTC = methodcaller("astimezone", UTC)
_DIGEST = methodcaller("digest")
_PRUNED = f'"{PRUNED_EVENT}"'.encode()
_CLOCK = f'"{CLOCK_BACKWARDS}"'.encode()

# Sealed records: integrity without parsing (issue 22). Parsing each line
# (orjson) alone held one core to ~a quarter of a disk's read rate. A record
# a valid checkpoint seals needs no parse, by this argument:
#
# 1. For every line L, hash its bytes less the one removable `,"hash":"<64
#    hex>"` member (B = L less that member) and compare with that member's
#    hex; link each line's prev to the line before's hash.
# 2. A checkpoint whose signature verifies with the device key and whose
#    head is the hash found at head_seq in this file: the daemon computed
#    that head as SHA-256 of the body it wrote for that record, so (SHA-256
#    being collision resistant) that line's B *is* the daemon's body. The
#    daemon's body has exactly one top-level prev (the hash of its body
#    before), so if each line holds exactly one `"prev":"` (counted), that
#    is it, and the line before's B is the daemon's body too: by induction,
#    every line up to head_seq, back to the file's first.
# 3. The daemon writes only canonical JSON (record.seal), and such a body
#    passes everything parse_line checks, once the hash member is put back
#    *where sorted keys put it*. The hash does not cover where it is, so the
#    pattern below proves it: it walks the top-level members from "{" (each
#    a key and a whole value; a value with a nested container, an escape or
#    a newline fails the pattern and the chunk is parsed instead), so the
#    member sits between two top-level members, and the keys around it sort
#    before and after "hash". With one removable member per line (counted:
#    a second one would be removed too and hide an edit) the line is the
#    canonical line of the daemon's record, byte for byte.
# 4. Lines no checkpoint of the same file seals (the tail after the last
#    head, any head outside the file or the window, every line when no key
#    was given) are proved of nothing by this: an attacker can write any
#    line with a hash of their own there. They are parsed and checked in
#    full (_Scanner.finish) before the file counts as clean, and their
#    columns must equal what the bytes said.
# Seqs are read the same way (one per line, counted) and must count up;
# checkpoints, audit.pruned and clock-step records, recoveries and any
# backslash send the chunk (or the line) to the parser, so those are
# handled exactly as before. A chunk the byte path doubts is parsed; a file
# the parser doubts goes to the record path, the only one that reports.
#
# One line, as far as it is needed: from
# its start, the top-level members before "hash", each a key and a complete
# value (a string without escapes, a number or literal, or an object or
# array holding no container and no escape); then the "hash" member and the
# next key; then, found by search (each is proved the only one in its line
# by counting), the prev and seq members. Captures: the last key before
# "hash", the hash, the key after it, prev, seq.
_PLAIN = rb'[^{}\[\]"\\\n]*+'  # inside a container: no bracket, quote, escape or newline
_CONTAINER = rb'(?!)'  # depth 0: none
for _depth in range(3):  # containers nested up to three deep (caller.chain, context...)
    _ATOM = rb'(?:"[^"\\\n]*+"|' + _CONTAINER + rb')'
    _INNER = _PLAIN + rb'(?:' + _ATOM + _PLAIN + rb')*+'
    _CONTAINER = rb'(?:\{' + _INNER + rb'\}|\[' + _INNER + rb'\])'
_VALUE = rb'(?:"[^"\\\n]*+"|[-+.0-9a-zE]++|' + _CONTAINER + rb')'
_SEALED_LINE = re.compile(
    rb'\n(\{(?:"([^"\\\n]*+)":' + _VALUE + rb',)+?)"hash":"([0-9a-f]{64})",'
    rb'("([^"\\\n]*+)":[^\n]*+)')
_PREV = b'"prev":"'
_SEQ = b'"seq":'
_CHECKPOINT_KIND = b'"kind":"checkpoint"'
_RECOVERY_KIND = b'"kind":"recovery"'
_PENDING_MAX = 64 * 1024 * 1024
"""Bytes of lines checked on bytes but not yet sealed that a scan holds at most."""
_SPAN_FILE_MAX = 256 * 1024 * 1024
"""A file up to this size is read whole, so its span hashes can be checked."""
_HASH_MEMBER = b'"hash":"'
_SPAN_SHA = b'"span_sha256":"'
_HOLE = "?" * 64
"""Stands for a hash inside a stretch a span hash proved (never extracted)."""
_SPAN_KEEP = 64 * 1024 * 1024
"""Bytes of lines the record path keeps for span hashes (a span is ~1,000 lines)."""


class _Window:
    """The hashes of the last ``size`` records by seq, for checkpoint heads.

    Checkpoints seal recent heads (seconds old), so a bounded window is
    enough and keeps memory flat on huge logs. Runs of consecutive seqs are
    stored as a list (record by record) or as one string of 64-char hashes
    (a whole file from the fast path), so remembering costs an append.
    """

    def __init__(self, size: int) -> None:
        self.size = max(0, size)
        self.last = 0
        self._runs: deque[tuple[int, list[str] | str | int]] = deque()

    def remember(self, seq: int, digest: str) -> None:
        runs = self._runs
        if runs and isinstance(runs[-1][1], list) and runs[-1][0] + len(runs[-1][1]) == seq:
            run = runs[-1][1]
            run.append(digest)
            if len(run) > max(2 * self.size, 1024):
                drop = len(run) - self.size
                del run[:drop]
                runs[-1] = (runs[-1][0] + drop, run)
        else:
            runs.append((seq, [digest]))
        self.last = seq
        self._trim()

    def extend(self, first: int, last: int, joined: str, holes_to: int = 0) -> None:
        """Hashes of ``last - len(joined) // 64 + 1 .. last``, joined (from a scan);
        ``first .. holes_to``: not sent (the file's proved stretches end there)."""
        if holes_to >= first:
            self._runs.append((first, holes_to - first + 1))
        if joined:
            self._runs.append((last - len(joined) // 64 + 1, joined))
        self.last = last
        self._trim()

    def _trim(self) -> None:
        runs, oldest = self._runs, self.last - self.size
        while runs and runs[0][0] + _run_len(runs[0][1]) - 1 <= oldest:
            runs.popleft()

    def get(self, seq: int) -> str | None:
        """The hash of ``seq``, or None outside the window.

        Raises :class:`_Rerun` for a seq inside a stretch a span hash proved
        (:data:`_HOLE`: its hashes were never extracted): only a log the
        daemon would not write asks, and the record path then answers.
        """
        if seq <= self.last - self.size:
            return None
        for first, run in reversed(self._runs):
            if seq >= first:
                at = seq - first
                if isinstance(run, int):
                    if at < run:
                        raise _Rerun
                    return None
                if isinstance(run, list):
                    return run[at] if at < len(run) else None
                found = run[64 * at:64 * at + 64] if 64 * at < len(run) else None
                if found == _HOLE:
                    raise _Rerun
                return found
        return None


def _run_len(run: list[str] | str | int) -> int:
    if isinstance(run, int):
        return run
    return len(run) if isinstance(run, list) else len(run) // 64


@dataclass
class _FileScan:
    """What a clean file contributes to the chain, for :meth:`_Verifier.apply`."""

    name: str
    records: int = 0
    first_seq: int = 0
    first_prev: str = ""
    last_seq: int = 0
    last_hash: str = ""
    hashes: str = ""  # the file's last (up to ``window``) hashes, joined
    holes_to: int = 0  # hashes from first_seq to this seq are not in ``hashes`` (holes)
    # (seq, head_seq, head, the chain's hash at head_seq if it is in this
    # file and in the window, else None)
    checkpoints: list[tuple[int, int, str, str | None]] = field(default_factory=list)
    prunes: list[tuple[int, object, object]] = field(default_factory=list)
    clock_steps_back: int = 0
    sealed: int = 0  # records proven by a checkpoint's seal without being parsed
    spanned: int = 0  # of those, proven by a signed span hash (no per-record work)


class _Scanner:
    """Checks one file chunk by chunk; any doubt returns False (use the slow path).

    Each chunk is offered to :meth:`sealed_chunk` (bytes only, for records a
    checkpoint of this file seals) and, if that declines, to :meth:`chunk`
    (every line parsed with orjson); :meth:`finish` parses what no
    checkpoint sealed.
    """

    def __init__(self, name: str, window: int, public_key: ec.EllipticCurvePublicKey | None,
                 kid: str | None) -> None:
        self.scan = _FileScan(name)
        self.window = max(0, window)
        self.public_key, self.kid = public_key, kid
        # Recent hashes as runs (first seq, 64-char hashes joined): at least the
        # last ``window`` before the chunk in hand, for checkpoint heads.
        self.runs: deque[tuple[int, str]] = deque()
        # The sealed-record path: the highest seq a checkpoint of this file
        # sealed (its signature verified, its head matched), and the chunks
        # checked on bytes that no such checkpoint covers yet.
        self.anchored = 0
        # (statement, signature) pairs that verified, so a checkpoint parsed
        # twice (span plan, then its stretch) costs one ECDSA verification.
        self.good: set[tuple[bytes, str]] = set()
        self.pending: deque[_Pending] = deque()
        self.pending_bytes = 0

    def chunk(self, texts: tuple[bytes, ...], lines: list[bytes]) -> bool:
        """Check ``lines`` (complete, without newlines); ``texts`` hold them all.

        ``texts`` is what the byte-level tests (escapes, float spellings)
        look at: bytes holding every line (more can only send a chunk to
        the slow path).
        """
        try:
            got = self._fast(texts, lines)
            if got is None:
                got = self._slow(lines)
            if got is None:
                return False
            return self._chain(texts, *got)
        except (ValueError, TypeError, KeyError, OverflowError, AttributeError):
            return False

    def _fast(self, texts: tuple[bytes, ...], lines: list[bytes]
              ) -> tuple[list[dict[str, Any]], tuple[Any, ...], tuple[Any, ...],
                         tuple[Any, ...], list[str]] | None:
        """Parse and self-check a chunk with C-level calls only, or None."""
        for data in texts:
            if not data.isascii() or b"\\" in data or b"\x7f" in data:
                return None  # escapes (orjson writes some raw): the slow path
            if _orjson_spelling_may_differ(data):
                return None
        try:
            objs = list(map(orjson.loads, lines))
        except orjson.JSONDecodeError:
            return None
        if not objs or set(map(type, objs)) != {dict}:
            return None
        # Canonical form of every line at once: each line parsed alone to one
        # object, so if the objects' encodings joined with commas equal the
        # lines joined with commas, each encoding equals its line (a JSON
        # object is never a proper prefix of another JSON value).
        if orjson.dumps(objs, option=_SORTED) != b"[" + b",".join(lines) + b"]":
            return None
        seqs, prevs, kinds, times = zip(*map(_COLUMNS, objs), strict=True)
        hashes: list[str] = list(map(dict.pop, objs, repeat("hash")))
        if set(map(len, hashes)) != {64}:
            return None
        # Each record without "hash", canonical, encoded at once; record i is
        # its line less the 74 bytes of its hash member, so the slices are
        # known from the line lengths.
        bodies = orjson.dumps(objs, option=_SORTED)
        lens = list(map(len, lines))
        ends = list(accumulate(map(sub, lens, repeat(_HASH_PAIR - 1))))
        if len(bodies) != ends[-1] + 1:
            return None
        starts = map(sub, ends, map(sub, lens, repeat(_HASH_PAIR)))
        digests = b"".join(map(_DIGEST, map(hashlib.sha256,
                                            map(bodies.__getitem__, map(slice, starts, ends)))))
        if digests.hex() != "".join(hashes):
            return None  # also proves every hash is 64 lowercase hex digits
        if set(map(type, times)) != {str}:
            return None
        stamps = list(map(datetime.fromisoformat, times))
        if None in map(_TZINFO, stamps):
            return None
        list(map(_TO_UTC, stamps))
        return objs, seqs, prevs, kinds, hashes

    @staticmethod
    def _slow(lines: list[bytes]
              ) -> tuple[list[dict[str, Any]], tuple[Any, ...], tuple[Any, ...],
                         tuple[Any, ...], list[str]] | None:
        """The reference self-check, line by line (still in this worker)."""
        try:
            objs = [parse_line(line) for line in lines]
        except RecordError:
            return None
        if not objs:
            return None
        seqs, prevs, kinds, _times = zip(*map(_COLUMNS, objs), strict=True)
        hashes: list[str] = list(map(dict.pop, objs, repeat("hash")))
        return objs, seqs, prevs, kinds, hashes

    def _chain(self, texts: tuple[bytes, ...], objs: list[dict[str, Any]], seqs: tuple[Any, ...],
               prevs: tuple[Any, ...], kinds: tuple[Any, ...], hashes: list[str]) -> bool:
        scan, n = self.scan, len(objs)
        if set(map(type, seqs)) != {int}:
            return False
        first = seqs[0]
        if first < 1 or seqs != tuple(range(first, first + n)):
            return False
        if scan.records:
            if first != scan.last_seq + 1 or prevs[0] != scan.last_hash:
                return False
        else:
            if not isinstance(prevs[0], str) or _HEX64.fullmatch(prevs[0]) is None:
                return False
            scan.first_seq, scan.first_prev = first, prevs[0]
        if list(prevs[1:]) != hashes[:-1] or not _FAST_KINDS.issuperset(kinds):
            return False
        self.runs.append((first, "".join(hashes)))
        i = -1
        for _ in range(kinds.count(KIND_CHECKPOINT)):
            i = kinds.index(KIND_CHECKPOINT, i + 1)
            if not self._checkpoint(objs[i], seqs[i]):
                return False
        if any(_PRUNED in data for data in texts):
            for i, rec in enumerate(objs):
                if rec.get("event") == PRUNED_EVENT and kinds[i] != KIND_CHECKPOINT:
                    scan.prunes.append((seqs[i], rec.get("last_seq"), rec.get("last_hash")))
        if any(_CLOCK in data for data in texts):
            scan.clock_steps_back += sum(CLOCK_BACKWARDS in rec for rec in objs)
        scan.records += n
        scan.last_seq, scan.last_hash = seqs[-1], hashes[-1]
        self._settle(first)
        return True

    def _checkpoint(self, rec: dict[str, Any], seq: int) -> bool:
        """:meth:`_Verifier.checkpoint`'s own checks; the head is matched by the caller."""
        if not self._checkpoint_valid(rec, seq):
            return False
        self._checkpoint_found(rec, seq)
        return True

    def _checkpoint_valid(self, rec: dict[str, Any], seq: int) -> bool:
        """A head that can be matched, the right key, a signature that verifies."""
        head_seq, head = rec.get("head_seq"), rec.get("head")
        if not isinstance(head_seq, int) or not isinstance(head, str) or head_seq >= seq:
            return False
        if self.public_key is not None:
            if rec.get("key") != self.kid:
                return False
            try:
                statement = (checkpoint_statement(rec), str(rec.get("sig", "")))
                if statement in self.good:
                    return True  # verified already (the span plan parses every checkpoint)
                self.public_key.verify(decode_sig(statement[1]), statement[0], _ES256)
            except (InvalidSignature, ValueError, KeyError):
                return False
            if len(self.good) > 4096:
                self.good.clear()
            self.good.add(statement)
        return True

    def _checkpoint_found(self, rec: dict[str, Any], seq: int) -> None:
        """Note a valid checkpoint (and what it seals, when its head is in this file)."""
        head_seq, head = rec["head_seq"], rec["head"]
        found = None
        if head_seq >= self.scan.first_seq and head_seq >= seq - self.window:
            found = self._recent(head_seq)
        self.scan.checkpoints.append((seq, head_seq, head, found))
        if found is not None and found == head and self.public_key is not None:
            self.anchored = max(self.anchored, head_seq)

    def _recent(self, seq: int) -> str | None:
        for first, joined in reversed(self.runs):
            if seq >= first:
                at = 64 * (seq - first)
                found = joined[at:at + 64] if at < len(joined) else None
                if found == _HOLE:
                    raise _Unsure  # a head inside a proved stretch: the record path
                return found
        return None

    def _settle(self, first: int) -> None:
        """After a chunk starting at ``first``: forget what no longer matters."""
        runs, oldest = self.runs, first - self.window
        while runs and runs[0][0] + len(runs[0][1]) // 64 - 1 < oldest:
            runs.popleft()
        pending = self.pending
        while pending and pending[0].last <= self.anchored:
            self.pending_bytes -= len(pending.popleft().buf)
        while self.pending_bytes > _PENDING_MAX and pending:
            entry = pending.popleft()
            self.pending_bytes -= len(entry.buf)
            if not self._confirm(entry):
                raise _Unsure

    def recent_hashes(self) -> tuple[str, int]:
        """The file's last ``window`` hashes after its last hole, joined, and the
        seq of that hole (0: none) -- for :class:`_FileScan`. Only heads after
        a file's last proved stretch are named by later files' checkpoints, so
        the holes (most of a file) are not sent; one named anyway makes the
        verify take the record path (:class:`_Rerun`)."""
        if self.window == 0:
            return "", 0
        runs = list(self.runs)
        for i in range(len(runs) - 1, -1, -1):
            first, joined = runs[i]
            cut = joined.rfind("?")
            if cut != -1:
                tail = joined[(cut // 64 + 1) * 64:] + "".join(j for _f, j in runs[i + 1:])
                return tail[-64 * self.window:], first + cut // 64
        return "".join(joined for _first, joined in runs)[-64 * self.window:], 0

    # -- the sealed-record path ---------------------------------------------------

    def sealed_chunk(self, buf: bytes) -> bool:
        """Check whole lines on their bytes, without parsing them ("Sealed records" above).

        ``buf`` is a newline, then complete lines each ending in a newline.
        False (nothing changed): the caller checks the chunk with
        :meth:`chunk` instead. Lines no checkpoint of this file seals stay
        pending until one does or :meth:`finish` checks them in full.
        """
        if self.public_key is None or _PRUNED in buf or _CLOCK in buf or _RECOVERY_KIND in buf:
            return False
        n = buf.count(b"\n") - 1
        rows = _SEALED_LINE.findall(buf)
        if n < 1 or len(rows) != n:
            return False
        heads, k0s, hashes, tails, k1s = zip(*rows, strict=True)
        if max(k0s) >= b"hash" or min(k1s) <= b"hash":
            return False  # "hash" is not where sorted keys put it
        # The body is the line less exactly the member the pattern found.
        joined = b"".join(hashes).decode("ascii")
        digests = map(_DIGEST, map(hashlib.sha256, map(bytes.__add__, heads, tails)))
        if b"".join(digests).hex() != joined:
            return False
        # prev and seq follow "hash" in sorted order, so they are in the tail:
        # exactly one of each there (first found == last found), holding the
        # hash of the line before and the next seq.
        at_prev = list(map(bytes.find, tails, repeat(_PREV)))
        at_seq = list(map(bytes.find, tails, repeat(_SEQ)))
        if (-1 in at_prev or -1 in at_seq
                or at_prev != list(map(bytes.rfind, tails, repeat(_PREV)))
                or at_seq != list(map(bytes.rfind, tails, repeat(_SEQ)))):
            return False
        tail0, at = tails[0], at_prev[0] + len(_PREV)
        prev0 = tail0[at:at + 64].decode("ascii")
        if _HEX64.fullmatch(prev0) is None or tail0[at + 64:at + 65] != b'"':
            return False
        at = at_seq[0] + len(_SEQ)
        digits = tail0[at:tail0.find(b",", at)]
        if not digits.isdigit() or digits[:1] == b"0":
            return False
        first = int(digits)
        scan = self.scan
        if scan.records and (first != scan.last_seq + 1 or prev0 != scan.last_hash):
            return False
        # line i's prev is line i-1's hash (64 hex digits, as only the daemon
        # writes it where a checkpoint seals it; the unsealed are parsed)
        links = map(_PREV.__add__, hashes)
        seqs = map(b'"seq":%d,'.__mod__, range(first, first + n))
        if not (all(map(bytes.startswith, tails[1:], links, at_prev[1:]))
                and all(map(bytes.startswith, tails, seqs, at_seq))):
            return False
        # Checkpoints (and anything else reading "kind":"checkpoint"): parsed
        # and checked in full, as the record path would.
        found: list[tuple[int, dict[str, Any]]] = []
        at, i, line_start = buf.find(_CHECKPOINT_KIND), -1, 0
        while at != -1:
            start = buf.rfind(b"\n", 0, at) + 1
            end = buf.find(b"\n", at)
            i += buf.count(b"\n", line_start, start)
            line_start = start
            try:
                rec = parse_line(buf[start:end])
            except RecordError:
                return False
            if (rec["seq"] != first + i or rec["hash"] != joined[64 * i:64 * i + 64]
                    or rec["prev"] != (joined[64 * i - 64:64 * i] if i else prev0)):
                return False
            if rec["kind"] == KIND_CHECKPOINT:
                if not self._checkpoint_valid(rec, first + i):
                    return False
                found.append((i, rec))
            elif rec["kind"] != KIND_EVENT:
                return False
            at = buf.find(_CHECKPOINT_KIND, end)
        # All checks passed: take the chunk.
        if not scan.records:
            scan.first_seq, scan.first_prev = first, prev0
        self.runs.append((first, joined))
        for i, rec in found:
            self._checkpoint_found(rec, first + i)
        scan.records += n
        scan.sealed += n
        scan.last_seq, scan.last_hash = first + n - 1, joined[-64:]
        entry = _Pending(first, first + n - 1, buf, joined, prev0,
                         frozenset(i for i, _rec in found))
        if entry.last > self.anchored:
            self.pending.append(entry)
            self.pending_bytes += len(buf)
        self._settle(first)
        return True

    # -- the span path ---------------------------------------------------------------

    def span(self, region: bytes, first: int, head_seq: int, head: str) -> bool:
        """Take lines whose exact bytes a verified checkpoint span hash proved.

        ``region`` is lines ``first..head_seq``, exactly the bytes the
        writer chained (:func:`_span_plan` checked their SHA-256 against the
        signed ``span_sha256``), so each is a valid record linking to the one
        before and the last one's hash is ``head``: nothing in them needs
        checking. What remains is what the record path would *report* and
        where the stretch sits: its first line must follow the chain so far,
        its checkpoints are counted (and their signatures verified, as
        everywhere), and its hashes are kept for later heads. A stretch with
        a retention, clock-step or recovery record is left to the other
        paths (they report those). False: nothing changed.
        """
        if _PRUNED in region or _CLOCK in region or _RECOVERY_KIND in region:
            return False
        # The proved bytes are the lines first..head_seq, the last one's hash
        # the head: no per-line work at all. Only the head's hash is kept; the
        # others are holes (_HOLE), which only a checkpoint the daemon would
        # not write (a head inside a stretch) ever looks up.
        n = head_seq - first + 1
        rec0 = orjson.loads(region[:region.find(b"\n")])
        prev0 = rec0.get("prev")
        if rec0.get("seq") != first or not isinstance(prev0, str):
            return False
        scan = self.scan
        if scan.records and (first != scan.last_seq + 1 or prev0 != scan.last_hash):
            return False
        found: list[tuple[int, dict[str, Any]]] = []
        at = region.find(_CHECKPOINT_KIND)
        while at != -1:
            end = region.find(b"\n", at)
            rec = orjson.loads(region[region.rfind(b"\n", 0, at) + 1:end])
            if rec.get("kind") == KIND_CHECKPOINT:
                if not self._checkpoint_valid(rec, rec["seq"]):
                    return False
                found.append((rec["seq"], rec))
            at = region.find(_CHECKPOINT_KIND, end)
        if not scan.records:
            scan.first_seq, scan.first_prev = first, prev0
        self.runs.append((first, _HOLE * (n - 1) + head))
        for seq, rec in found:
            self._checkpoint_found(rec, seq)
        scan.records += n
        scan.sealed += n
        scan.spanned += n
        scan.last_seq, scan.last_hash = head_seq, head
        self.anchored = max(self.anchored, head_seq)
        self._settle(first)
        return True

    def finish(self) -> bool:
        """At the end of the file: check in full what no checkpoint here sealed."""
        while self.pending:
            entry = self.pending.popleft()
            if entry.last > self.anchored and not self._confirm(entry):
                return False
        return True

    def _confirm(self, entry: _Pending) -> bool:
        """Check a pending chunk's unsealed lines in full; same columns as on bytes?"""
        lines = entry.buf.split(b"\n")[1:-1]
        skip = max(0, self.anchored - entry.first + 1)
        lines = lines[skip:]
        if not lines:
            return True
        try:
            got = self._fast((b"\n".join(lines),), lines)
            if got is None:
                got = self._slow(lines)
        except (ValueError, TypeError, KeyError, OverflowError, AttributeError):
            return False
        if got is None:
            return False
        _objs, seqs, prevs, kinds, hashes = got
        self.scan.sealed -= len(lines)
        first = entry.first + skip
        prev = entry.prev0 if skip == 0 else entry.hashes[64 * skip - 64:64 * skip]
        expected = tuple(KIND_CHECKPOINT if j in entry.checkpoints else KIND_EVENT
                         for j in range(skip, skip + len(lines)))
        return (seqs == tuple(range(first, first + len(lines)))
                and "".join(hashes) == entry.hashes[64 * skip:]
                and prevs[0] == prev and list(prevs[1:]) == hashes[:-1]
                and kinds == expected)


@dataclass
class _Pending:
    """A chunk checked on its bytes whose lines no checkpoint has sealed yet."""

    first: int
    last: int
    buf: bytes  # a newline, then the lines
    hashes: str  # their hashes, joined
    prev0: str  # the first line's prev
    checkpoints: frozenset[int]  # which lines (0-based) were checkpoints


class _Unsure(Exception):
    """A pending chunk failed its full check: the file takes the record path."""


def _span_plan(data: bytes, scanner: _Scanner) -> list[tuple[int, int, int, int, str]] | None:
    """The stretches of ``data`` that their checkpoint's signed span hash proves.

    Returns ``(start, end, first seq, head seq, head)`` in file order. Every
    checkpoint line (found by a byte search) that carries a span and whose
    signature verifies is parsed; its span starts where the previous span
    ended (``span_from`` = that head + 1), at the file's start, or (after a
    restart) at the line holding ``"seq":span_from,``; it ends with the line
    whose hash member is the signed head. The SHA-256 of exactly those bytes
    must equal the signed ``span_sha256``. None: a signed span that does
    not match where it must be (the record path then reports it, or finds
    why); a span starting in an earlier file is skipped (its part here is
    checked record by record).
    """
    plan: list[tuple[int, int, int, int, str]] = []
    newline = data.find(b"\n")
    if newline == -1:
        return plan
    try:
        file_first = orjson.loads(data[:newline]).get("seq")
    except (orjson.JSONDecodeError, AttributeError):
        return plan
    at = data.find(_CHECKPOINT_KIND)
    while at != -1:
        start_cp = data.rfind(b"\n", 0, at) + 1
        end_cp = data.find(b"\n", at)
        if end_cp == -1:
            break
        at = data.find(_CHECKPOINT_KIND, end_cp)
        line = data[start_cp:end_cp]
        if _SPAN_SHA not in line:
            continue
        # Only signed fields are used here; the line's own integrity and place
        # in the chain are checked by whichever path takes its stretch.
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # the other paths find it
        if (not isinstance(rec, dict) or rec.get("kind") != KIND_CHECKPOINT
                or type(rec.get("seq")) is not int
                or not scanner._checkpoint_valid(rec, rec["seq"])):
            continue
        first, head_seq, head = rec.get("span_from"), rec["head_seq"], rec["head"]
        sha = rec.get("span_sha256")
        if (type(first) is not int or not 1 <= first <= head_seq or not isinstance(sha, str)
                or _HEX64.fullmatch(sha) is None):
            return None  # the record path reports it as malformed
        if not isinstance(file_first, int) or first < file_first:
            continue
        low = plan[-1][1] if plan else 0
        if plan and first == plan[-1][3] + 1:
            start = low
        elif not plan and first == file_first:
            start = 0
        else:
            found = data.find(b'"seq":%d,' % first, low, start_cp)
            if found == -1:
                return None
            start = data.rfind(b"\n", 0, found) + 1
            if start < low:
                return None
        found = data.find(_HASH_MEMBER + head.encode("ascii") + b'"', start, start_cp)
        if found == -1:
            return None
        end = data.find(b"\n", found) + 1
        if hashlib.sha256(memoryview(data)[start:end]).hexdigest() != sha:
            return None
        plan.append((start, end, first, head_seq, head))
    return plan


def _take(scanner: _Scanner, buf: bytes) -> bool:
    """A newline, then whole lines: the sealed byte path, else the parsing path."""
    try:
        if scanner.sealed_chunk(buf):
            return True
    except (ValueError, TypeError, KeyError, OverflowError, IndexError):
        return False  # e.g. a byte that is not ASCII where a hash was read
    return scanner.chunk((buf,), buf.split(b"\n")[1:-1])


def _scan_spans(scanner: _Scanner, data: bytes, chunk: int) -> bool:
    """A whole file: proved spans taken at once, the rest chunk by chunk."""
    if data and not data.endswith(b"\n"):
        return False  # a torn line: the record path says where and whether it matters
    try:
        plan = _span_plan(data, scanner)
    except (ValueError, TypeError, KeyError, OverflowError, UnicodeDecodeError):
        plan = None
    if plan is None:
        return False
    pos = 0
    for start, end, first, head_seq, head in [*plan, (len(data), len(data), 0, 0, "")]:
        while pos < start:  # lines no span proves: the other paths, in chunks
            cut = data.rfind(b"\n", pos, min(start, pos + chunk)) + 1
            if cut <= pos:
                cut = data.find(b"\n", pos) + 1
            if not _take(scanner, b"\n" + data[pos:cut]):
                return False
            pos = cut
        if end > start:
            try:
                taken = scanner.span(data[start:end], first, head_seq, head)
            except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
                taken = False
            if not taken:
                while pos < end:  # e.g. a retention record in it: chunk by chunk
                    cut = data.rfind(b"\n", pos, min(end, pos + chunk)) + 1
                    if cut <= pos:
                        cut = data.find(b"\n", pos) + 1
                    if not _take(scanner, b"\n" + data[pos:cut]):
                        return False
                    pos = cut
            pos = end
    return scanner.finish()


_KEYS: dict[bytes, tuple[ec.EllipticCurvePublicKey, str]] = {}


def _scan_file(path: str, window: int, public_der: bytes | None,
               chunk: int = _CHUNK) -> _FileScan | None:
    """Check one log file on the fast path; None if it needs the record-by-record one.

    Runs in a worker process (hence the key as DER bytes) or in-process.
    ``chunk``: bytes read at a time; a chunk the C-level checks refuse is
    checked record by record, so smaller chunks confine that to fewer records
    (the daemon's start-up scan of its last file uses 256 KiB).
    """
    key: ec.EllipticCurvePublicKey | None = None
    kid: str | None = None
    if public_der is not None:
        if public_der not in _KEYS:
            loaded = serialization.load_der_public_key(public_der)
            assert isinstance(loaded, ec.EllipticCurvePublicKey)
            _KEYS[public_der] = (loaded, key_id(loaded))
        key, kid = _KEYS[public_der]
    scanner = _Scanner(os.path.basename(path), window, key, kid)
    # Parsing a chunk makes ~100,000 dicts: the cyclic collector would walk
    # them again and again for nothing (they hold no cycles).
    collecting = gc.isenabled()
    gc.disable()
    try:
        with open(path, "rb") as fh:
            if key is not None and os.fstat(fh.fileno()).st_size <= _SPAN_FILE_MAX:
                # Read whole: span hashes prove stretches between checkpoints.
                return _finish_scan(scanner) if _scan_spans(scanner, fh.read(), chunk) else None
            carry = b""
            while block := fh.read(chunk):
                cut = block.rfind(b"\n") + 1
                if cut == 0:
                    carry += block
                    continue
                buf = b"".join((b"\n", carry, memoryview(block)[:cut]))
                carry = block[cut:]
                if not _take(scanner, buf):
                    return None
            if carry:
                return None  # a torn line: the slow path says where and whether it matters
            if not scanner.finish():
                return None
    except (OSError, _Unsure):
        return None
    finally:
        if collecting:
            gc.enable()
    return _finish_scan(scanner)


def _finish_scan(scanner: _Scanner) -> _FileScan:
    scan = scanner.scan
    scan.hashes, scan.holes_to = scanner.recent_hashes()
    return scan


def _public_der(public_key: ec.EllipticCurvePublicKey | None) -> bytes | None:
    if public_key is None:
        return None
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _auto_jobs(paths: list[Path]) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        total = sum(p.stat().st_size for p in paths)
    except OSError:
        return 1
    return min(cpus, 8) if total >= PARALLEL_MIN_BYTES else 1


class _Stop(Exception):
    pass


class _Rerun(Exception):
    """A checkpoint names a head inside a proved stretch: verify record by record."""


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
        self.recent = _Window(window)
        # Runs of non-checkpoint records not sealed yet: [first seq, last seq,
        # file, line of the first]; one run per file between checkpoints, so
        # this stays small whatever the log's length.
        self.unsealed: deque[list[object]] = deque()
        # A log whose first record is not seq 1 (retention removed the oldest
        # files): anchored on its own prev, provisionally, until an
        # audit.pruned record names exactly that seq and hash.
        self.pending_prune: tuple[int, str, BadRecord] | None = None
        # The exact bytes of the lines since the last span checkpoint's head
        # (consecutive seqs, at most _SPAN_KEEP bytes), to check the next
        # checkpoint's span hash; cleared when a file is taken whole (apply).
        self.span_lines: deque[tuple[int, bytes]] = deque()
        self.span_kept = 0

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
            self.add_unsealed(seq, seq, name, line.lineno)
        if rec["kind"] == KIND_RECOVERY:
            r.recoveries.append(BadRecord(*where, "recovery", _recovery_text(rec)))
            self.check_cut(rec, where, line.path.parent)
        if rec.get("event") == PRUNED_EVENT and rec["kind"] != KIND_CHECKPOINT:
            self.pruned(rec, seq)
        if CLOCK_BACKWARDS in rec:
            r.clock_steps_back += 1
        self.remember(seq, rec["hash"])
        self.keep_line(seq, line.data)
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
        self.check_span(rec, where, head_seq)
        self.report.checkpoints += 1
        if known is not None and head_seq > self.report.sealed_seq:
            self.seal_up_to(head_seq)

    def keep_line(self, seq: int, data: bytes) -> None:
        """Keep a checked line's bytes for the next checkpoint's span hash."""
        lines = self.span_lines
        if lines and lines[-1][0] != seq - 1:
            lines.clear()
            self.span_kept = 0
        lines.append((seq, data))
        self.span_kept += len(data)
        while self.span_kept > _SPAN_KEEP:
            self.span_kept -= len(lines.popleft()[1])

    def check_span(self, rec: Mapping[str, object], where: tuple[str, int, int],
                   head_seq: int) -> None:
        """A checkpoint's span hash must match the kept bytes of its lines.

        Checked whenever those lines are all kept (consecutive, read by this
        path); otherwise the checkpoint counts exactly as one without the
        fields would (its head and signature were checked as always).
        """
        has_from, has_sha = "span_from" in rec, "span_sha256" in rec
        if not has_from and not has_sha:
            return
        span_from, span_sha = rec.get("span_from"), rec.get("span_sha256")
        if (not has_from or not has_sha or type(span_from) is not int
                or not 1 <= span_from <= head_seq or not isinstance(span_sha, str)
                or _HEX64.fullmatch(span_sha) is None):
            self.fail(BadRecord(*where, "malformed", "checkpoint with an invalid span"))
        lines = self.span_lines
        if not lines or lines[0][0] > span_from or lines[-1][0] < head_seq:
            return
        digest = hashlib.sha256()
        for seq, data in lines:
            if seq > head_seq:
                break
            if seq >= span_from:
                digest.update(data)
        if digest.hexdigest() != span_sha:
            self.fail(BadRecord(*where, "checkpoint_span_mismatch",
                                f"signed hash of the lines seq {span_from}..{head_seq} does "
                                "not match them: records in that span were changed, added, "
                                "removed or moved"))
        while lines and lines[0][0] <= head_seq:
            self.span_kept -= len(lines.popleft()[1])

    def add_unsealed(self, first: int, last: int, name: str, lineno: int) -> None:
        """Records ``first..last`` (lines from ``lineno`` of ``name``) await a checkpoint."""
        tail = self.unsealed[-1] if self.unsealed else None
        if (tail is not None and tail[1] == first - 1 and tail[2] == name
                and tail[3] + (first - tail[0]) == lineno):  # type: ignore[operator]
            tail[1] = last
        else:
            self.unsealed.append([first, last, name, lineno])

    def seal_up_to(self, head_seq: int) -> None:
        """A checkpoint whose head matched the chain seals everything up to it."""
        self.report.sealed_seq = head_seq
        runs = self.unsealed
        while runs and runs[0][1] <= head_seq:  # type: ignore[operator]
            runs.popleft()
        if runs and runs[0][0] <= head_seq:  # type: ignore[operator]
            cut = head_seq + 1 - runs[0][0]  # type: ignore[operator]
            runs[0][0] = head_seq + 1
            runs[0][3] += cut  # type: ignore[operator]

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
        self.recent.remember(seq, digest)

    def finish(self) -> None:
        if self.pending_prune is not None:
            self.fail(self.pending_prune[2])
        self.report.unsealed = sum(int(r[1]) - int(r[0]) + 1  # type: ignore[call-overload]
                                   for r in self.unsealed)
        if self.strict and self.unsealed:
            first, _last, name, lineno = self.unsealed[0]
            assert isinstance(first, int) and isinstance(name, str) and isinstance(lineno, int)
            self.fail(BadRecord(name, lineno, first, "unsealed_tail",
                                "record after the last valid checkpoint"))

    # -- the fast path: a whole file checked by _scan_file ----------------------

    def apply(self, scan: _FileScan) -> bool:
        """Take a file :func:`_scan_file` found clean, as :meth:`line` would have.

        Returns False, changing nothing, when the file's place in the chain
        needs the record-by-record path: its first record does not follow
        the chain so far, a checkpoint names a head that does not match, or
        the start is special (``--from``, a pruned prefix). That path then
        reports exactly what it always did; this one only skips its work
        for files it would have passed.
        """
        if scan.records == 0:
            return True
        if self.prev_seq is None:
            return False
        if scan.first_seq != self.prev_seq + 1 or scan.first_prev != self.prev_hash:
            return False
        known: list[str | None] = []
        for seq, head_seq, head, local in scan.checkpoints:
            found = local if head_seq >= scan.first_seq else (
                self.recent.get(head_seq) if head_seq >= seq - self.window else None)
            if found is not None and found != head:
                return False
            known.append(found)
        r = self.report
        # Non-checkpoint runs first: sealing compares seqs only, and a
        # checkpoint seals nothing after itself, so the order is immaterial.
        start = scan.first_seq
        for seq, *_ in scan.checkpoints:
            if seq > start:
                self.add_unsealed(start, seq - 1, scan.name, start - scan.first_seq + 1)
            start = seq + 1
        if start <= scan.last_seq:
            self.add_unsealed(start, scan.last_seq, scan.name, start - scan.first_seq + 1)
        for (_seq, head_seq, *_), found in zip(scan.checkpoints, known, strict=True):
            if found is None:
                r.unchecked_checkpoints += 1
            r.checkpoints += 1
            if found is not None and head_seq > r.sealed_seq:
                self.seal_up_to(head_seq)
        for seq, last_seq, last_hash in scan.prunes:
            self.pruned({"last_seq": last_seq, "last_hash": last_hash}, seq)
        r.clock_steps_back += scan.clock_steps_back
        self.span_lines.clear()  # the file's lines were not kept: no span check across it
        self.span_kept = 0
        self.recent.extend(scan.first_seq, scan.last_seq, scan.hashes, scan.holes_to)
        self.prev_seq, self.prev_hash = scan.last_seq, scan.last_hash
        r.records += scan.records
        if r.first_seq is None:
            r.first_seq = scan.first_seq
        r.last_seq, r.head = scan.last_seq, scan.last_hash
        return True


def verify(
    directory: Path | str,
    public_key: ec.EllipticCurvePublicKey | None = None,
    *,
    from_seq: int | None = None,
    strict: bool = False,
    window: int = 200_000,
    jobs: int | None = None,
    fast: bool = True,
) -> VerifyReport:
    """Check every record from ``from_seq`` (default: seq 1) to the end.

    Without ``public_key`` only the hash chain is checked -- which anyone can
    recompute after an edit, so that proves integrity against accidents, not
    against an attacker. ``strict`` also fails on an unsealed tail and a torn
    last line. ``window`` bounds memory: a checkpoint whose head is more than
    ``window`` records back cannot be matched and is counted as unchecked
    (checkpoints normally seal heads a few thousand records back at most).
    ``jobs``: processes checking files at once (default: the usable CPUs
    once the log holds ``PARALLEL_MIN_BYTES``, else 1). ``fast=False``
    checks record by record only (the reference the fast path is tested
    against). Raises :class:`ConfigError` if ``directory`` is not a directory.
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
    der = _public_der(public_key)
    workers = (jobs if jobs is not None else _auto_jobs(paths)) if fast else 1
    pool = _Pool(paths, window, der, workers - 1 if len(paths) > 2 else 0) if fast else None
    try:
        for i, p in enumerate(paths):
            scan = pool.take(i) if pool is not None else None
            if scan is not None and v.apply(scan):
                continue
            for line in files.iter_lines(p):
                v.line(line, is_last=i == len(paths) - 1)
        if from_seq is not None and v.prev_seq is None:
            v.fail(BadRecord(paths[-1].name if paths else str(path), 0, None, "seq_gap",
                             f"log has no seq {from_seq}"))
        v.finish()
    except _Stop:
        pass
    except _Rerun:
        # A checkpoint named a head inside a stretch a span hash proved without
        # keeping its hashes: no daemon writes that, so answer it exactly.
        if pool is not None:
            pool.close()
            pool = None
        return verify(path, public_key, from_seq=from_seq, strict=strict, window=window,
                      fast=False)
    finally:
        if pool is not None:
            pool.close()
    report = v.report
    if report.first_bad is not None:
        _logger.info("audit verify failed: %s", report.first_bad)
    return report


# A worker is a fresh interpreter: it takes its sys.path (one length-prefixed
# JSON frame, read before badged can be imported), then scans files.
_WORKER = ("import json, sys\n"
           "n = int.from_bytes(sys.stdin.buffer.read(8), 'big')\n"
           "sys.path[:0] = json.loads(sys.stdin.buffer.read(n))\n"
           "from badged.audit.verify import _serve\n"
           "_serve()\n")


def _send(stream: Any, obj: object) -> None:
    body = orjson.dumps(obj)
    stream.write(len(body).to_bytes(8, "big") + body)
    stream.flush()


def _recv(stream: Any) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    size = int.from_bytes(head, "big")
    body = stream.read(size)
    if len(body) < size:
        raise EOFError
    return orjson.loads(body)


def _serve() -> None:
    """A worker process: scan the files it is sent, one at a time, until stdin closes."""
    import sys

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _send(stdout, "ready")  # imported: the parent hands out work only now
    while True:
        try:
            path, window, der_hex = _recv(stdin)
        except EOFError:
            return
        der = bytes.fromhex(der_hex) if der_hex is not None else None
        _send(stdout, _scan_file(path, window, der))


def _scan_from(doc: object) -> _FileScan | None:
    """A worker's answer back to a :class:`_FileScan` (None stays None)."""
    if not isinstance(doc, dict):
        return None
    scan = _FileScan(**doc)
    scan.checkpoints = [(c[0], c[1], c[2], c[3]) for c in scan.checkpoints]
    scan.prunes = [(p[0], p[1], p[2]) for p in scan.prunes]
    return scan


class _Pool:
    """Files scanned ahead by worker processes while the caller walks the chain.

    Workers are fresh interpreters (``python -c``) fed over pipes, never
    forks (the caller may hold locks in other threads) and never
    ``multiprocessing`` spawns (those re-run the caller's main script). Each
    takes the lowest file nobody has started; the caller scans a file itself
    when it gets there first, and steals the highest unstarted file while it
    waits, so no core idles. Any failure of a worker only means that file
    has no scan (the record-by-record path then checks it).
    """

    def __init__(self, paths: list[Path], window: int, der: bytes | None, workers: int) -> None:
        import threading

        self._paths, self._window, self._der = paths, window, der
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._todo = deque(range(len(paths)))
        self._done: dict[int, _FileScan | None] = {}
        self._procs: list[Any] = []
        self._threads: list[threading.Thread] = []
        for _ in range(workers):
            proc = self._spawn()
            if proc is None:
                break
            thread = threading.Thread(target=self._feed, args=(proc,), daemon=True,
                                      name="audit-verify-feed")
            thread.start()
            self._procs.append(proc)
            self._threads.append(thread)

    @staticmethod
    def _spawn() -> Any:
        import subprocess
        import sys

        try:
            proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, close_fds=True)
            _send(proc.stdin, list(sys.path))
        except (OSError, ValueError):
            return None
        return proc

    def _next(self, *, last: bool = False) -> int | None:
        with self._lock:
            if not self._todo:
                return None
            return self._todo.pop() if last else self._todo.popleft()

    def _feed(self, proc: Any) -> None:
        der = self._der.hex() if self._der is not None else None
        try:
            if _recv(proc.stdout) != "ready":
                return
        except Exception:
            return
        while (i := self._next()) is not None:
            scan: _FileScan | None = None
            try:
                _send(proc.stdin, [str(self._paths[i]), self._window, der])
                scan = _scan_from(_recv(proc.stdout))
            except Exception:  # the worker died or was stopped: no scan for this file
                _logger.debug("audit verify worker failed", exc_info=True)
                self._put(i, None)
                return
            self._put(i, scan)

    def _put(self, i: int, scan: _FileScan | None) -> None:
        with self._ready:
            self._done[i] = scan
            self._ready.notify_all()

    def _scan(self, i: int) -> None:
        self._put(i, _scan_file(str(self._paths[i]), self._window, self._der))

    def take(self, i: int) -> _FileScan | None:
        """File ``i``'s scan (None: check it record by record)."""
        while True:
            with self._lock:
                if i in self._done:
                    return self._done.pop(i)
                mine = i in self._todo
                if mine:
                    self._todo.remove(i)
            if mine:
                self._scan(i)
                continue
            j = self._next(last=True)
            if j is not None:
                self._scan(j)  # a worker has file i: do a later one meanwhile
                continue
            with self._ready:
                if i not in self._done and any(t.is_alive() for t in self._threads):
                    self._ready.wait(1.0)
                elif i not in self._done:
                    self._done[i] = None

    def close(self) -> None:
        """Stop the workers: any file still in hand is no longer wanted (they only read)."""
        with self._lock:
            self._todo.clear()
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.kill()
        for proc in self._procs:
            proc.wait()
        for thread in self._threads:
            thread.join(timeout=10)
        for proc in self._procs:
            proc.stdout.close()


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
