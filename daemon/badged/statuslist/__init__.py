"""Token Status List (draft-ietf-oauth-status-list): revocation that reaches relying parties.

A relying party with a cached JWKS keeps accepting a token until it expires;
revoking the agent only drops its key from the *next* JWKS. So every access
token carries ``status: {status_list: {idx, uri}}``, a position in one bit
array the daemon publishes signed (:meth:`StatusList.token`): bit ``idx`` set
means the token is revoked. Revoking an agent, a step-up grant or a
delegation sets the bits of the live tokens it covers
(:meth:`StatusList.revoke`).

Format (draft §4, §5): 1 bit per token, index ``i`` at byte ``i // 8``, bit
``i % 8`` counting from the least significant; the byte array ZLIB-compressed
(RFC 1950) and base64url-encoded in ``status_list.lst``; the Status List Token
is a JWS with ``typ: statuslist+jwt``, ``sub`` = the ``uri`` tokens carry,
``iat``, ``exp`` and ``ttl``, signed by the **device key** (the daemon's own
key, never an agent's: an agent key revoked must not be the one that says so).

Bounds and durability:

* **Size**: :data:`DEFAULT_SIZE` = 2^21 indices (256 KiB of bits before
  compression; a sparse list compresses to under a kilobyte). Sized so the
  daemon's measured peak (~5,000 tokens/s) at the default 300 s lifetime
  (plus skew) stays below it.
* **Allocation** is sequential, modulo the size, and *reserved* on disk a
  block of :data:`BLOCK` at a time (``state.json``, atomic replace): after a
  restart allocation resumes past the last reserved block, so an index is
  never handed out twice while a token holding it may be live.
* **Which token holds which index** is kept in memory and in an append-only
  journal (``journal``: ``idx exp agent grant delegation`` per line, written
  in batches of at most :data:`JOURNAL_BATCH` lines or :data:`JOURNAL_DELAY`
  seconds, and at a clean stop; compacted to the live entries at start and
  when it grows), so a revocation after a restart still finds the tokens
  issued before it. A crash (kill -9) can lose the lines still waiting; their
  tokens were allocated after the last fsync, so start-up's reconciliation
  (below) puts them back from their audit records, which are written before
  the token leaves. The journal is not fsynced per token (an fsync per token would
  double the issuance path's fsyncs); it is fsynced whenever a block is
  reserved, and ``state.json`` records when (``synced_at``). So after a
  *power loss* only lines of tokens allocated since ``synced_at`` can be
  missing, and each of those tokens has a ``token.issued`` audit record naming
  its ``status_idx``. Start-up **reconciles** from the audit log
  (:func:`issued_from_audit`): the ``token.issued`` records written since
  ``synced_at`` (and never older than ``max_ttl``: older tokens have
  expired) are added back to the map. Cost: reading the audit bytes written
  since ``synced_at`` (at most one block, 4,096, of them token records; at
  most ``max_ttl`` of time) plus the start of the file holding it (<
  ``rotate_bytes``), parsing only lines containing ``"status_idx"``. So a revocation reaches
  every token whose ``token.issued`` record is durable: with
  ``[audit] durability = "fsync"`` every token that was handed out; with
  ``"write"`` a power loss can lose the last ``sync_delay`` of audit records
  and those tokens with them (docs/status-list.md, "Durability").
* **Full**: when the next index still belongs to a token that has not
  expired, the list is full and issuance is refused with RESOURCE_EXHAUSTED
  and a retry-after of that token's remaining life; an index is never reused
  while its token may be live. With the daemon's ``max_ttl`` cap that takes
  2^21 tokens within one token lifetime.
* **Privacy**: the list is bits only; which agent holds an index is in the
  daemon's private state, never in the list. Indices are sequential, so the
  list reveals roughly how many tokens were issued, not by whom.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from badged.audit import files as audit_files
from badged.audit.record import parse_time
from badged.core.clock import Clock
from badged.core.jose import b64url, ec_public_jwk, encode_jws, jwk_thumbprint
from badged.core.tokens import ES256
from badged.errors import ConfigError, RateLimitedError
from badged.fsutil import atomic_write
from badged.keystore.port import KeyHandle

_logger = logging.getLogger(__name__)

DEFAULT_SIZE = 1 << 21
BLOCK = 4096
TYP = "statuslist+jwt"
# Status values (draft §7.1): 0x00 VALID, 0x01 INVALID.
VALID, INVALID = 0, 1
# Relying parties allow clock skew: keep an index taken this long past exp.
_SKEW = 60
# Journal lines are written in batches: at most this many tokens' lines, or
# lines this old (checked at each allocation), wait in memory. One write(2)
# per token was ~2-3 % of the event loop at 16 clients (it can wait behind
# the audit log's fsync on the same filesystem). A crash loses at most the
# waiting lines, and start-up restores them from their token.issued records
# (reconciliation reads everything since the last journal fsync).
JOURNAL_BATCH = 64
JOURNAL_DELAY = 0.25


class _Chunk:
    """Who holds the indices ``start .. start + len``: what a revocation matches on
    (never published).

    Parallel columns instead of one object per token: an ``array`` of expiry
    times (8 bytes a slot) and three lists of references to the agent, grant
    and delegation strings, which are shared (the same objects for every token
    of an agent; start-up interns what it reads), so ~32 bytes a slot instead
    of the ~250 a dict entry, a NamedTuple, a float, an int and a heap tuple
    per token cost. An ``exp`` of 0 is an empty slot. A chunk is :data:`BLOCK`
    indices, the unit of allocation's reservations, and is dropped whole once
    its latest ``exp`` plus skew has passed (:meth:`StatusList._prune`).
    """

    __slots__ = ("agent", "delegation", "exp", "grant", "held", "start", "top")

    def __init__(self, start: int, n: int) -> None:
        self.start = start
        self.exp = array("d", bytes(8 * n))
        self.agent: list[str] = [""] * n
        self.grant: list[str] = [""] * n
        self.delegation: list[str] = [""] * n
        self.top = 0.0  # the latest exp in the chunk
        self.held = 0  # slots ever filled (reuse overwrites one)


class Issued(NamedTuple):
    """A ``token.issued`` audit record's status-list fields (reconciliation)."""

    idx: int
    exp: float
    agent: str
    grant: str | None
    delegation: str | None


# The audit events of credentials that carry a status claim (and status_idx).
ISSUED_EVENTS = frozenset({"token.issued", "jwt_svid.issued"})

IssuedSince = Callable[[float], Iterable[Issued]]
"""``since`` (wall-clock seconds) -> the tokens issued from then on, per the audit log."""


def issued_from_audit(audit_dir: Path) -> IssuedSince:
    """Reads the audit log for :class:`StatusList` start-up reconciliation.

    Starts at the last file whose first record is no newer than ``since``
    (files are named by their first seq, and times only grow within the
    chain, give or take a clock step, which the caller's margin covers); only
    lines that mention ``status_idx`` are parsed as JSON.
    """
    def since(t: float) -> Iterator[Issued]:
        if not audit_dir.is_dir():
            return
        paths = audit_files.list_files(audit_dir)
        start = 0
        for i in range(len(paths) - 1, -1, -1):
            first = _first_time(paths[i])
            if first is not None and first <= t:
                start = i
                break
        for path in paths[start:]:
            for line in audit_files.iter_lines(path):
                data = line.data
                if not line.complete or b'"status_idx"' not in data:
                    continue
                try:
                    rec = json.loads(data)
                    idx, exp, agent = rec["status_idx"], rec["exp"], rec["agent"]
                except (ValueError, KeyError, TypeError):
                    continue
                if rec.get("event") not in ISSUED_EVENTS or not isinstance(idx, int) \
                        or not isinstance(exp, (int, float)) or not isinstance(agent, str):
                    continue
                grant, delegation = rec.get("grant"), rec.get("delegation")
                yield Issued(idx, float(exp), agent,
                             grant if isinstance(grant, str) else None,
                             delegation if isinstance(delegation, str) else None)

    return since


def _first_time(path: Path) -> float | None:
    """When ``path``'s first record was written; None if unreadable."""
    try:
        with open(path, "rb") as fh:
            line = fh.readline(1 << 20)
        return parse_time(json.loads(line)["time"]).timestamp()
    except (OSError, ValueError, KeyError, TypeError):
        return None


class StatusList:
    """The issuer side: allocate, mark, publish. Thread-safe (mint functions
    may run on the signing thread)."""

    def __init__(self, directory: Path, *, uri: str, clock: Clock,
                 size: int = DEFAULT_SIZE, list_ttl: int = 300,
                 issued_since: IssuedSince | None = None, max_ttl: float = 86400) -> None:
        if size % 8 or size < BLOCK:
            raise ConfigError(f"status list size {size} must be a multiple of 8, >= {BLOCK}")
        self.uri = uri
        self.size = size
        self.list_ttl = list_ttl
        self._dir = directory
        self._clock = clock
        self._lock = threading.Lock()
        self._bits = bytearray(size // 8)
        # Holders by chunk of BLOCK indices (idx // BLOCK); a chunk whose
        # tokens have all expired is dropped once per block (_prune), so the
        # memory, the journal (compacted when it is twice the held entries)
        # and revoke()'s scan stay the size of the *live* tokens (to a chunk),
        # not of every token ever issued.
        self._chunks: dict[int, _Chunk] = {}
        self._held = 0  # filled slots in _chunks
        self._revoked: set[int] = set()  # live indices whose bit is set
        self._next = 0  # counter; index = counter % size
        self._reserved = 0  # counter value up to which blocks are reserved on disk
        self._version = 0  # bumped on every change of the bits
        self._signed: tuple[int, float, str] | None = None  # (version, signed at, jwt)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._state = directory / "state.json"
        self._journal_path = directory / "journal"
        self._synced_at = 0.0  # wall time of the journal's last fsync (state.json)
        self.reconciled = 0  # tokens found in the audit log, not in the journal
        self._journal = -1  # opened after the start-up compaction
        self._journal_lines = 0  # lines in the journal file (set by _compact)
        self._pending: list[str] = []  # journal lines not yet written (JOURNAL_BATCH)
        self._pending_at = 0.0  # monotonic time the oldest of them was made
        self._load(issued_since, max_ttl)
        self._journal = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    # -- holders ----------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Index slots kept in memory (live tokens, plus expired ones sharing a chunk)."""
        return self._held

    def _exp(self, idx: int) -> float:
        """The held ``exp`` of ``idx``; 0.0 when nobody holds it."""
        chunk = self._chunks.get(idx // BLOCK)
        return 0.0 if chunk is None else chunk.exp[idx - chunk.start]

    def _put(self, idx: int, exp: float, agent: str, grant: str, delegation: str) -> None:
        key = idx // BLOCK
        chunk = self._chunks.get(key)
        if chunk is None:
            start = key * BLOCK
            chunk = self._chunks[key] = _Chunk(start, min(BLOCK, self.size - start))
        off = idx - chunk.start
        if not chunk.exp[off]:
            chunk.held += 1
            self._held += 1
        chunk.exp[off] = exp
        chunk.agent[off] = agent
        chunk.grant[off] = grant
        chunk.delegation[off] = delegation
        if exp > chunk.top:
            chunk.top = exp

    def _entries(self) -> Iterator[tuple[int, float, str, str, str]]:
        """Every held slot: (idx, exp, agent, grant, delegation)."""
        for chunk in self._chunks.values():
            start, agents, grants, delegations = \
                chunk.start, chunk.agent, chunk.grant, chunk.delegation
            for off, exp in enumerate(chunk.exp):
                if exp:
                    yield start + off, exp, agents[off], grants[off], delegations[off]

    # -- durability -----------------------------------------------------------------

    def _load(self, issued_since: IssuedSince | None, max_ttl: float) -> None:
        now = self._clock()
        revoked: list[int] = []
        synced_at: float | None = None
        if self._state.exists():
            try:
                doc = json.loads(self._state.read_text())
                if int(doc["size"]) != self.size:
                    raise ConfigError(
                        f"status list was created with size {doc['size']}, not {self.size}",
                        path=str(self._state))
                self._reserved = self._next = int(doc["reserved"])
                revoked = [int(i) for i in doc.get("revoked", [])]
                if "synced_at" in doc:
                    synced_at = float(doc["synced_at"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"status list state is corrupt: {exc}",
                                  path=str(self._state)) from None
        names: dict[str, str] = {}  # one string object per name, as on the issuance path
        intern = names.setdefault
        if self._journal_path.exists():
            with open(self._journal_path, encoding="ascii", errors="replace") as fh:
                for line in fh:
                    parts = line.rstrip("\n").split(" ")
                    if len(parts) != 5:
                        continue  # a torn last line after a crash
                    try:
                        idx, exp = int(parts[0]), float(parts[1])
                    except ValueError:
                        continue
                    if 0 <= idx < self.size and exp + _SKEW > now and exp > 0:
                        self._put(idx, exp, intern(parts[2], parts[2]),
                                  intern(parts[3], parts[3]), intern(parts[4], parts[4]))
        if issued_since is not None and self._state.exists():
            # Power loss: lines written after the last fsync may be gone; the
            # audit log names those tokens. A state file without synced_at
            # (older daemon): reconcile the whole max_ttl window.
            horizon = now - max_ttl - 2 * _SKEW
            since = horizon if synced_at is None else max(horizon, synced_at - _SKEW)
            for rec in issued_since(since):
                if not 0 <= rec.idx < self.size or rec.exp + _SKEW <= now \
                        or self._exp(rec.idx) or int(rec.exp) <= 0:
                    continue
                grant, delegation = rec.grant or "-", rec.delegation or "-"
                self._put(rec.idx, float(int(rec.exp)), intern(rec.agent, rec.agent),
                          intern(grant, grant), intern(delegation, delegation))
                self.reconciled += 1
            if self.reconciled:
                _logger.warning("status list: %d token(s) missing from the journal "
                                "restored from the audit log", self.reconciled)
        for idx in revoked:
            if 0 <= idx < self.size and self._exp(idx):
                self._set(idx)
        self._compact()

    def _compact(self) -> None:
        """Rewrite the journal with the live entries only, and the state file."""
        horizon = self._clock() - _SKEW
        self._pending.clear()  # held in memory, so in the rewrite below
        lines = "".join(f"{i} {exp:.0f} {agent} {grant} {delegation}\n"
                        for i, exp, agent, grant, delegation in self._entries()
                        if exp > horizon)
        atomic_write(self._journal_path, lines.encode("ascii"))
        if self._journal >= 0:  # the old descriptor names the replaced (unlinked) file
            os.close(self._journal)
            self._journal = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                    0o600)
        self._journal_lines = lines.count("\n")
        self._synced_at = self._clock()  # atomic_write fsyncs
        self._save_state()

    def _prune(self) -> None:
        """Forget expired holders (lock held; once per block).

        A chunk whose latest token is past exp + skew is dropped whole; the
        set bit of any token past exp + skew is cleared, as reuse of its index
        would, since no relying party accepts the expired token anyway. Cost:
        the chunks (at most size / BLOCK) and the revoked live indices, per
        block of allocations; without it the holders of every token ever
        issued (up to ``size``) stayed and the journal, never compactable,
        grew forever.
        """
        horizon = self._clock() - _SKEW
        for key in [k for k, c in self._chunks.items() if c.top <= horizon]:
            self._held -= self._chunks.pop(key).held
        gone = [i for i in self._revoked if self._exp(i) <= horizon]
        for idx in gone:
            self._bits[idx >> 3] &= ~(1 << (idx & 7)) & 0xFF
            self._revoked.discard(idx)
        if gone:
            self._version += 1

    def _save_state(self) -> None:
        revoked = sorted(i for i in self._revoked if self._exp(i))
        atomic_write(self._state, json.dumps(
            {"size": self.size, "reserved": self._reserved, "revoked": revoked,
             "synced_at": self._synced_at}).encode())

    # -- bits -------------------------------------------------------------------------

    def _get(self, idx: int) -> int:
        return (self._bits[idx >> 3] >> (idx & 7)) & 1

    def _set(self, idx: int) -> None:
        self._bits[idx >> 3] |= 1 << (idx & 7)
        self._revoked.add(idx)
        self._version += 1

    def status(self, idx: int) -> int:
        with self._lock:
            return self._get(idx)

    # -- issuer side ------------------------------------------------------------------

    def allocate(self, *, exp: float, agent: str, grant: str | None,
                 delegation: str | None) -> int:
        """An index for a token expiring at ``exp``; RateLimitedError when full."""
        end = int(exp)
        held_until, grant, delegation = float(end), grant or "-", delegation or "-"
        with self._lock:
            counter = self._next
            idx = counter % self.size
            old = self._exp(idx)
            if old:
                left = old + _SKEW - self._clock()
                if left > 0:
                    raise RateLimitedError(
                        f"status list full: index {idx} still held for {left:.0f}s",
                        retry_after=left)
                if idx in self._revoked:  # the old token is gone: its index starts valid
                    self._bits[idx >> 3] &= ~(1 << (idx & 7)) & 0xFF
                    self._revoked.discard(idx)
                    self._version += 1
            if counter >= self._reserved:
                self._reserved = counter + BLOCK
                self._prune()
                if self._journal_lines > 2 * self._held + BLOCK:
                    self._compact()
                else:
                    # Every line so far is durable from here: start-up then
                    # reconciles only tokens allocated after this point.
                    # Once per block: ~1 fsync per 4,096 tokens.
                    self._write_pending()
                    os.fsync(self._journal)
                    self._synced_at = self._clock()
                    self._save_state()
            self._next = counter + 1
            self._put(idx, held_until or 1.0, agent, grant, delegation)
            pending = self._pending
            if not pending:
                self._pending_at = time.monotonic()
            pending.append(f"{idx} {end} {agent} {grant} {delegation}\n")
            self._journal_lines += 1
            if len(pending) >= JOURNAL_BATCH or time.monotonic() - self._pending_at >= JOURNAL_DELAY:
                self._write_pending()
            return idx

    def _write_pending(self) -> None:
        """Append the journal lines not yet written, in one ``write(2)`` (lock held)."""
        if self._pending:
            data = "".join(self._pending).encode()
            self._pending.clear()
            os.write(self._journal, data)

    def flush(self) -> None:
        """Write the journal lines still in memory (at a clean stop; see the module doc)."""
        with self._lock:
            if self._journal >= 0:
                self._write_pending()

    def claim(self, idx: int) -> dict[str, Any]:
        """The referenced token's ``status`` claim (draft §6.1)."""
        return {"status_list": {"idx": idx, "uri": self.uri}}

    def revoke(self, *, agent: str | None = None, grant: str | None = None,
               delegation: str | None = None) -> int:
        """Set the bit of every live token of this agent / grant / delegation; how many."""
        now = self._clock()
        marked = 0
        horizon = now - _SKEW
        with self._lock:
            for chunk in self._chunks.values():
                exps = chunk.exp
                for column, wanted in ((chunk.agent, agent), (chunk.grant, grant),
                                       (chunk.delegation, delegation)):
                    if wanted is None:
                        continue
                    off = -1
                    while True:  # list.index: the scan runs in C, ~0.1 s per million
                        try:
                            off = column.index(wanted, off + 1)
                        except ValueError:
                            break
                        idx = chunk.start + off
                        if exps[off] > horizon and idx not in self._revoked:
                            self._set(idx)
                            marked += 1
            if marked:
                self._save_state()
        return marked

    def encoded(self) -> dict[str, Any]:
        """The ``status_list`` member: bits and the ZLIB-compressed, base64url list."""
        with self._lock:
            raw = bytes(self._bits)
        return {"bits": 1, "lst": b64url(zlib.compress(raw, 9))}

    def token(self, device_key: KeyHandle, *, sign: Callable[[bytes], bytes] | None = None) -> str:
        """The signed Status List Token, re-signed only when the bits changed or
        half its lifetime has passed (a TPM signature costs ~200 ms)."""
        now = self._clock()
        with self._lock:
            version = self._version
        cached = self._signed
        if cached is not None and cached[0] == version and now - cached[1] < self.list_ttl / 2:
            return cached[2]
        jwk = ec_public_jwk(device_key.public_key())
        header = {"alg": "ES256", "typ": TYP, "kid": jwk_thumbprint(jwk)}
        claims = {"sub": self.uri, "iat": int(now), "exp": int(now) + self.list_ttl,
                  "ttl": max(1, math.ceil(self.list_ttl / 10)), "status_list": self.encoded()}
        signer = sign or (lambda data: device_key.sign(data, ES256))
        jwt = encode_jws(header, claims, signer)
        self._signed = (version, now, jwt)
        return jwt

    def close(self) -> None:
        try:
            self.flush()
        except OSError:
            pass
        try:
            os.close(self._journal)
        except OSError:
            pass
