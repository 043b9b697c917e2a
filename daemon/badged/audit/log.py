"""The audit log writer: hash-chained, group-committed, crash-safe.

Usage (daemon, on its asyncio loop)::

    log = AuditLog.open(AuditConfig(directory=Path("/var/lib/badged/audit")),
                        signer=device_key)           # ConfigError: refuse to start
    log.append_sync({"event": "daemon.start", "version": "0.1.0"})
    receipt = await log.append({"event": "token.issued", "agent": "deploy-bot",
                                "decision": "allow", "jti": jti,
                                "credential_sha256": sha})   # AuditError: issue nothing
    ...
    await log.aclose()                                # signs a final checkpoint

Why it is built this way:

* **Durable before acknowledged.** ``append`` returns only after the record's
  bytes are written *and* fsync'd; a credential is handed out only after that.
* **Group commit.** One writer thread takes *everything* queued, writes it with
  one ``write`` and one ``fsync``, then resolves all waiting futures with one
  ``call_soon_threadsafe``. While it sits in fsync (which releases the GIL) new
  records queue up, so N concurrent requests cost ~2 fsyncs, not N.
* **Little Python off the loop.** Records are chained, serialized and hashed on
  the caller's thread under a short lock; the writer thread only joins bytes
  and makes syscalls, so it does not fight signing threads for the GIL.
* **Checkpoints off the hot path.** A checkpoint signs an *earlier* head
  (seq, hash) on a separate one-thread executor -- a TPM needs ~200 ms per
  signature -- and is then appended like any record. Appends never wait for it.
* **Durability mode** (``AuditConfig.durability``). ``"fsync"`` (default):
  as above. ``"write"``: ``append`` returns once the record is *written*
  (``write(2)`` into the file, so it survives a crash of the daemon, kill -9
  included), and a background thread makes it durable within
  ``sync_delay`` (one sync for everything written meanwhile). An OS crash or
  power loss can lose the records of that last window -- a missing or torn
  *unsealed* tail that the next start cuts and states in a recovery record
  -- but never a sealed one: a checkpoint's bytes are written only after
  everything it seals has been synced (docs/audit.md, "Durability modes").
  Blocking appends (``append_sync``: start/stop, key lifecycle) are fsync'd
  before they return in both modes.
* **Fail closed.** A write or fsync error fails every record not yet durable
  with :class:`~badged.errors.AuditError`, the file is cut back to its last
  durable byte and the chain rewinds. An fsync error poisons the log (after a
  failed fsync the kernel may have dropped dirty pages, so nothing that
  follows can be trusted) until the daemon restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.audit import files
from badged.audit.record import (
    CLOCK_BACKWARDS,
    GENESIS,
    KIND_CHECKPOINT,
    KIND_EVENT,
    KIND_RECOVERY,
    RecordError,
    check_event,
    checked_event,
    checkpoint_statement,
    encode_sig,
    format_time,
    from_timestamp,
    key_id,
    parse_line,
    parse_time,
    seal,
)
from badged.audit.retention import Pruned, RetentionPolicy, prune
from badged.audit.verify import sealed_in_cut
from badged.errors import AuditError, BadgedError, ConfigError
from badged.keystore.port import KeyHandle

_logger = logging.getLogger(__name__)

_ES256: Final = ec.ECDSA(hashes.SHA256())
_CONFIG_ERRNOS: Final = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOENT}
)

Clock = Callable[[], float]
WriteFn = Callable[[int, bytes], int]
FsyncFn = Callable[[int], None]
MirrorFn = Callable[[bytes], None]
"""Receives each durable batch (one or more complete lines) for a best-effort copy."""


def unsafe_no_fsync(fd: int) -> None:
    """An ``fsync`` that does nothing: ONLY for benchmarks measuring fsync's cost.

    Passing it to :meth:`AuditLog.open` means an acknowledged record can be
    lost in a power failure, which breaks the promise the daemon makes. The
    name is meant to stand out in a code review.
    """


# Group commit under load: when other calls are in flight, the writer waits
# this long after the first queued record so that the records of the calls
# behind it share one write+fsync (PostgreSQL's commit_delay, for the same
# reason). Measured at 16 clients: without it almost every fsync carried one
# record, so every call paid a whole fsync and two thread wake-ups. 600 µs
# rather than the first 300 µs once calls got cheaper (~3,500/s at 16 lean
# clients): paired 6-round A/B Sign +8 %, FetchToken +3 %, 4 clients neutral,
# p99 no worse - a closed loop at 16 clients waits ~4 ms per call anyway.
COMMIT_DELAY_S = 0.0006
GATHER_ENOUGH = 8  # records already queued: write them now
GATHER_MIN_OTHERS = 3  # calls in flight beyond those queued, to be worth a wait
DURABILITY_MODES: Final = ("fsync", "write")
# append_later: a record nobody waits for is written with the next batch, or
# by the writer this long after it was queued if no batch comes.
LATER_S: Final = 0.1
MAX_SYNC_DELAY_S: Final = 1.0


@dataclass(frozen=True)
class AuditConfig:
    """Where the log lives and when it rotates and seals.

    ``rotate_bytes``/``rotate_seconds``: start a new file once the current one
    is this big/old (checked between batches, so a file may exceed it by one
    batch). ``checkpoint_records``/``checkpoint_seconds``: sign a checkpoint
    after this many records or this long after the last one (``None`` turns a
    trigger off); a checkpoint is always signed at close.
    """

    directory: Path
    rotate_bytes: int = 16 * 1024 * 1024
    rotate_seconds: float | None = 24 * 3600.0
    checkpoint_records: int | None = 1000
    checkpoint_seconds: float | None = 60.0
    # "fsync": durable before the answer. "write": written before the answer,
    # durable within sync_delay seconds (module doc; docs/audit.md).
    durability: str = "fsync"
    sync_delay: float = 0.05
    # Retention (badged.audit.retention): 0 keeps forever. Checked every
    # retain_check_seconds on a worker thread, never on the request path.
    retain_bytes: int = 0
    retain_days: float = 0.0
    export_dir: Path | None = None
    retain_keep: int = 2
    retain_check_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.durability not in DURABILITY_MODES:
            raise ConfigError(f"audit durability must be one of {', '.join(DURABILITY_MODES)}")
        if not 0 < self.sync_delay <= MAX_SYNC_DELAY_S:
            raise ConfigError(f"audit sync_delay must be in (0, {MAX_SYNC_DELAY_S:g}] seconds")
        if self.rotate_bytes < 1:
            raise ConfigError("audit rotate_bytes must be positive")
        if self.retain_bytes < 0 or self.retain_days < 0:
            raise ConfigError("audit retain_bytes/retain_days must be 0 (keep) or positive")
        if self.retain_keep < 1 or self.retain_check_seconds <= 0:
            raise ConfigError("audit retain_keep and retain_check_seconds must be positive")
        for name in ("rotate_seconds", "checkpoint_seconds", "checkpoint_records"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"audit {name} must be positive or unset")


@dataclass(frozen=True)
class AuditReceipt:
    """Proof for the caller that its record is durable: where it is in the chain."""

    seq: int
    hash: str
    time: str


@dataclass
class AuditStats:
    """Counters for tests and metrics (read without locking: approximate)."""

    records: int = 0  # records made durable
    batches: int = 0  # write+fsync rounds (== data fsyncs)
    failed: int = 0  # records failed with AuditError
    checkpoints: int = 0
    assigned: int = 0  # records chained and queued (durable or not)
    syncs: int = 0  # background syncs ("write" mode)
    synced_seq: int = 0  # every record up to this seq has been fsync'd


@dataclass(frozen=True)
class _Head:
    seq: int
    hash: str
    dt: datetime | None
    kind: str = KIND_EVENT


class _Entry:
    """One queued record. Slots: many are created per second on the hot path."""

    __slots__ = ("dt", "error", "event", "future", "kind", "line", "loop", "receipt")

    def __init__(self, receipt: AuditReceipt, line: bytes, kind: str, dt: datetime) -> None:
        self.receipt = receipt
        self.dt = dt
        self.line = line
        self.kind = kind
        self.future: asyncio.Future[AuditReceipt] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event: threading.Event | None = None
        self.error: BaseException | None = None


class AuditTamperedError(ConfigError):
    """A record a valid checkpoint had sealed is damaged: refuse to start, cut nothing."""


class _FsyncError(Exception):
    """fsync failed: unlike a failed write this cannot be undone by truncating."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(f"fsync failed: {cause}")
        self.cause = cause


def _resolve(entries: list[_Entry], error: BaseException | None) -> None:
    """Runs on the event loop: wake every waiter of a finished batch."""
    for entry in entries:
        fut = entry.future
        if fut is None or fut.done():  # caller gave up (cancelled): record still written
            continue
        if error is None:
            fut.set_result(entry.receipt)
        else:
            fut.set_exception(_audit_error(error))


def _audit_error(cause: BaseException) -> AuditError:
    if isinstance(cause, AuditError):
        return AuditError(cause.detail)
    err = AuditError(f"audit record not durable: {cause}")
    err.__cause__ = cause
    return err


class AuditLog:
    """Append-only, hash-chained audit log in one directory. See module doc.

    Build with :meth:`open`; the constructor is private plumbing.
    """

    def __init__(
        self,
        config: AuditConfig,
        *,
        clock: Clock,
        signer: KeyHandle | None,
        write: WriteFn,
        fsync: FsyncFn,
        mirror: MirrorFn | None = None,
    ) -> None:
        self.config = config
        self.directory = Path(config.directory)
        self.stats = AuditStats()
        self._clock = clock
        self._signer = signer
        self._signer_kid = key_id(signer.public_key()) if signer is not None else None
        self._write = write
        self._fsync = fsync
        self._cond = threading.Condition(threading.Lock())
        # chain state, guarded by _cond (advanced when a record is queued)
        self._head = _Head(0, GENESIS, None)
        self._durable = self._head
        self._epoch = 0  # bumped when a failure rewinds the chain
        # Span hash (guarded by _cond): SHA-256 of the exact bytes of every line
        # chained since seq _span_from, in chain order; a checkpoint signs it
        # (span_from/span_sha256) and starts the next span after its head.
        # None: no span (before open, after a failure rewound the chain) --
        # the next checkpoint then carries none and starts one.
        self._span: hashlib._Hash | None = None
        self._span_from = 0
        self._queue: list[_Entry] = []
        # Of the queued records, how many someone waits for; the others
        # (append_later) ride along with the next batch or go at _later_due.
        self._wanted = 0
        self._later_due: float | None = None
        # The loop on which a _later_tick timer is pending, if any.
        self._later_loop: asyncio.AbstractEventLoop | None = None
        self._busy = False  # someone (writer thread or an inline append) owns the file now
        # Hints from the front: solo() "no other call in flight" (a lone
        # call's record is fsync'd inline); in_flight() the calls being
        # handled (under load the writer gathers for commit_delay).
        self.solo: Callable[[], bool] | None = None
        self.in_flight: Callable[[], int] | None = None
        self.commit_delay = COMMIT_DELAY_S
        self._closing = False
        self._stopping = False
        self._closed = False
        self._poisoned: BaseException | None = None
        # owned by the writer thread once started
        self._fd = -1
        self._path = self.directory
        self._size = 0  # durable size of the current file
        self._file_opened_at = 0.0
        self._lock_fd = -1
        self._thread: threading.Thread | None = None
        # checkpoint scheduling: touched only on the event loop thread, except
        # _sealed_seq/_since_cp/_last_cp_at which are guarded by _cond
        self._sealed_seq = 0  # highest head_seq covered by a durable checkpoint
        self._last_event_seq = 0  # highest seq of a record that is not a checkpoint
        self._since_cp = 0
        self._last_cp_at = 0.0
        self._cp_task: asyncio.Task[None] | None = None
        self._cp_timer: asyncio.TimerHandle | None = None
        self._sign_pool: ThreadPoolExecutor | None = None
        # retention: a loop timer (monotonic) hands the work to a thread
        self._retention = RetentionPolicy(config.retain_bytes, config.retain_days,
                                          config.export_dir, config.retain_keep)
        self._retain_timer: asyncio.TimerHandle | None = None
        self._retain_task: asyncio.Future[list[Pruned]] | None = None
        self._retain_lock = threading.Lock()
        # optional best-effort copy (syslog/journald), on its own thread so a
        # slow or dead syslog can never delay or fail a durable append
        self._mirror = mirror
        self._mirror_q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._mirror_thread: threading.Thread | None = None
        # "write" mode: the background syncer. _sync_lock is held around every
        # sync of _fd and around replacing/closing _fd, so a sync never hits
        # a closed (or reused) descriptor; _sync_cv guards _written_seq.
        self._write_mode = config.durability == "write"
        self._sync_lock = threading.Lock()
        self._sync_cv = threading.Condition(threading.Lock())
        self._written_seq = 0
        self._sync_stop = False
        self._sync_thread: threading.Thread | None = None

    # -- construction ---------------------------------------------------------

    @classmethod
    def open(
        cls,
        config: AuditConfig,
        *,
        clock: Clock = time.time,
        signer: KeyHandle | None = None,
        write: WriteFn = os.write,
        fsync: FsyncFn = os.fsync,
        mirror: MirrorFn | None = None,
        move_aside_sealed: int | None = None,
    ) -> AuditLog:
        """Open (creating, recovering) the log and start its writer thread.

        Raises :class:`~badged.errors.ConfigError` when the directory cannot be
        used (not a directory, read-only, no permission, locked by another
        process): the daemon must refuse to start rather than run unaudited.
        ``write``/``fsync`` are seams for fault-injection tests. ``mirror``
        (e.g. :func:`badged.audit.mirror.syslog_mirror`) gets a copy of every
        durable batch, after the fact and best effort.

        A damaged record that a valid checkpoint had sealed is tampering, not a
        crash: :class:`AuditTamperedError` (a ConfigError: refuse to start).
        ``move_aside_sealed=SEQ`` is the operator's explicit answer (``badged
        recover --audit-move-aside SEQ``): cut from that damaged seq anyway,
        stating it in the recovery record (``sealed: true``), which
        ``verify`` then reports forever.
        """
        log = cls(config, clock=clock, signer=signer, write=write, fsync=fsync, mirror=mirror)
        try:
            log._open_dir()
            log._recover_and_open_file(move_aside_sealed)
        except OSError as exc:
            log._release_lock()
            if exc.errno in _CONFIG_ERRNOS:
                raise ConfigError(f"audit directory unusable: {exc.strerror}",
                                  path=str(config.directory)) from exc
            raise AuditError(f"cannot open audit log in {config.directory}: {exc}") from exc
        except BaseException:
            log._release_lock()
            raise
        log._last_cp_at = clock()
        with log._cond:  # the first span starts at this process's first line
            log._span, log._span_from = hashlib.sha256(), log._head.seq + 1
        if signer is not None:
            log._sign_pool = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="badged-audit-sign")
        log.stats.synced_seq = log._written_seq = log._durable.seq
        log._thread = threading.Thread(target=log._writer_main, name="badged-audit-writer",
                                       daemon=True)
        log._thread.start()
        if log._write_mode:
            log._sync_thread = threading.Thread(target=log._syncer_main,
                                                name="badged-audit-sync", daemon=True)
            log._sync_thread.start()
        if mirror is not None:
            log._mirror_thread = threading.Thread(target=log._mirror_main,
                                                  name="badged-audit-mirror", daemon=True)
            log._mirror_thread.start()
        return log

    def _open_dir(self) -> None:
        d = self.directory
        if d.exists() and not d.is_dir():
            raise ConfigError("audit path exists and is not a directory", path=str(d))
        d.mkdir(mode=files.DIR_MODE, parents=True, exist_ok=True)
        mode = d.stat().st_mode & 0o777
        if mode != files.DIR_MODE:
            # mkdir honours umask and an existing dir may have been created by
            # hand; audit records name agents and callers, so keep them private.
            _logger.warning("audit dir %s had mode %o; setting 0700", d, mode)
            os.chmod(d, files.DIR_MODE)
        lock_fd = os.open(d / files.LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          files.FILE_MODE)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise ConfigError("audit log is in use by another process", path=str(d)) from None
        self._lock_fd = lock_fd
        for stale in d.glob(".*.recover"):
            stale.unlink()

    def _release_lock(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _recover_and_open_file(self, move_aside_sealed: int | None = None) -> None:
        """Find the chain head; cut and seal a torn tail; open the file for append.

        Only an *unsealed* tail is cut: if a checkpoint after the damage had
        sealed it, the damage is tampering and the start is refused unless
        the operator asked to move exactly that seq onwards aside.
        """
        paths = files.list_files(self.directory)
        if not paths:
            self._open_file(self.directory / files.file_name(1))
            return
        last = paths[-1]
        scan = _scan_tail_file(last)
        head, good_end, cut_reason, cut_lineno = scan.head, scan.good_end, scan.reason, scan.lineno
        if head is None:
            head = _head_before(paths[:-1])
        self._head = self._durable = head
        self._sealed_seq, self._last_event_seq = scan.sealed_seq, scan.last_event_seq
        if cut_reason is not None:
            bad_seq = head.seq + 1
            public = self._signer.public_key() if self._signer is not None else None
            data = last.read_bytes()[good_end:]
            sealer = sealed_in_cut(data, bad_seq, public)
            sealed: dict[str, Any] = {}
            if sealer is not None:
                if move_aside_sealed != bad_seq:
                    raise AuditTamperedError(
                        f"audit log {last.name} line {cut_lineno} (seq {bad_seq}) is damaged "
                        f"({cut_reason}) but the signed checkpoint seq {sealer} had sealed it: "
                        "this is tampering, not a crash, and nothing was cut. Keep a copy of "
                        "the audit directory, then run 'badged recover --audit-move-aside "
                        f"{bad_seq}' (with the same --config or --dev STATE_DIR) to move seq "
                        f"{bad_seq} onwards aside (audited) and start",
                        path=str(self.directory))
                sealed = {"sealed": True, "sealed_by": sealer,
                          "operator": "badged recover --audit-move-aside"}
                cut_reason = f"operator moved aside records sealed by checkpoint seq {sealer}: " \
                             + cut_reason
            elif move_aside_sealed is not None:
                raise ConfigError(f"--audit-move-aside {move_aside_sealed}: seq "
                                  f"{move_aside_sealed} is not a sealed damaged record "
                                  f"(the damage starts at seq {bad_seq}, and is unsealed)",
                                  path=str(self.directory))
            self._seal_cut(last, good_end, cut_reason, cut_lineno, sealed)
        elif move_aside_sealed is not None:
            raise ConfigError(f"--audit-move-aside {move_aside_sealed}: the last audit file "
                              "has no damaged record", path=str(self.directory))
        self._open_file(last)

    def _open_file(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     files.FILE_MODE)
        try:
            os.fchmod(fd, files.FILE_MODE)
            size = os.fstat(fd).st_size
            files.fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._path, self._size = fd, path, size
        self._file_opened_at = self._clock()

    def _seal_cut(self, path: Path, good_end: int, reason: str, lineno: int,
                  extra: dict[str, Any] | None = None) -> None:
        """Move a torn/invalid tail aside and seal the cut with a ``recovery`` record.

        Atomic by construction: the cut bytes are saved first, then the file is
        replaced (rename) by valid-prefix + recovery record. A crash in between
        leaves the torn file in place and the next open redoes the whole thing,
        so a cut is never on disk without the record that states it.
        """
        data = path.read_bytes()
        cut = data[good_end:]
        side = path.with_name(f"{path.name}.cut-{good_end}")
        _write_file_durably(side, cut)
        parsed = []
        for raw in cut.split(b"\n"):
            with contextlib.suppress(RecordError):
                parsed.append(parse_line(raw)["seq"])
        fields: dict[str, Any] = {
            "event": "audit.recovery",
            "reason": reason,
            "file": path.name,
            "line": lineno,
            "offset": good_end,
            "cut_bytes": len(cut),
            "cut_sha256": hashlib.sha256(cut).hexdigest(),
            "cut_lines": cut.count(b"\n") + (0 if cut.endswith(b"\n") else 1),
            "moved_to": side.name,
        }
        if parsed:
            fields["cut_seqs"] = [min(parsed), max(parsed)]
        if extra:
            fields.update(extra)
        with self._cond:
            entry = self._chain_locked(fields, KIND_RECOVERY, internal=True)
        tmp = path.with_name(f".{path.name}.recover")
        _write_file_durably(tmp, data[:good_end] + entry.line)
        os.replace(tmp, path)
        files.fsync_dir(self.directory)
        self._durable = self._head
        _logger.error("audit log %s: cut %d bytes at line %d (%s); saved to %s; sealed as seq %d",
                      path, len(cut), lineno, reason, side.name, entry.receipt.seq)

    # -- appending --------------------------------------------------------------

    def _chain_locked(self, fields: dict[str, Any], kind: str, *, internal: bool = False,
                      epoch: int | None = None, float_free: bool = False) -> _Entry:
        """Give ``fields`` the next seq/time/prev, hash it and return its entry.

        Caller holds ``_cond``, so seq order is chain order even with
        appenders on several threads, and the clock is read inside the same
        critical section: ``time`` never goes backwards unless the clock does.
        """
        if self._poisoned is not None:
            raise AuditError(f"audit log failed earlier, restart required: {self._poisoned}")
        if self._closing and not internal:
            raise AuditError("audit log is closed")
        if epoch is not None and epoch != self._epoch:
            raise AuditError("chain rewound by a write failure; checkpoint dropped")
        head = self._head
        dt = from_timestamp(self._clock())
        record = fields
        record["seq"] = head.seq + 1
        record["time"] = format_time(dt)
        record["prev"] = head.hash
        record["kind"] = kind
        if head.dt is not None and dt < head.dt:
            # The clock went backwards (NTP step, bad RTC). seq stays the
            # order; the step is stated so a reader does not mistake it.
            record[CLOCK_BACKWARDS] = (head.dt - dt).total_seconds()
            _logger.warning("clock went backwards by %.6fs at audit seq %d",
                            (head.dt - dt).total_seconds(), head.seq + 1)
        digest, line = seal(record, float_free=float_free and CLOCK_BACKWARDS not in record)
        if self._span is not None:
            self._span.update(line)  # the one span cost per append (~0.3 µs)
        entry = _Entry(AuditReceipt(head.seq + 1, digest, record["time"]), line, kind, dt)
        self._head = _Head(head.seq + 1, digest, dt, kind)
        if kind != KIND_CHECKPOINT:
            self._last_event_seq = head.seq + 1
        if kind == KIND_EVENT:
            self._since_cp += 1
        self.stats.assigned += 1
        return entry

    def _chain_and_enqueue(self, fields: dict[str, Any], kind: str, entry_setup: Callable[
            [_Entry], None], *, internal: bool = False, epoch: int | None = None,
            float_free: bool = False) -> _Entry:
        # One critical section for chain + queue: a record must never be
        # chained (so later records link to it) without also being queued.
        with self._cond:
            if self._stopping:
                raise AuditError("audit log is closed")
            entry = self._chain_locked(fields, kind, internal=internal, epoch=epoch,
                                       float_free=float_free)
            entry_setup(entry)
            self._queue.append(entry)
            self._wanted += 1
            if not self._busy:
                # A busy writer (or inline append) looks at the queue again before it
                # waits (_writer_main, _release_busy): no wake-up needed. Under load
                # the writer is busy most of the time, and Condition.notify is Python
                # code (~1 % of the event loop at 16 clients).
                self._cond.notify()
            return entry

    async def append(self, event: Mapping[str, Any]) -> AuditReceipt:
        """Append ``event``; return once it is durable (written and fsync'd).

        Raises ``ValueError``/``TypeError`` for an event that must not or
        cannot be logged (nothing is written), and :class:`AuditError` when the
        record could not be made durable: then the caller must issue nothing.
        """
        fields, float_free = checked_event(event)
        loop = asyncio.get_running_loop()
        if self._write_mode or (self.solo is not None and self.solo()):
            # "write" mode: a write(2) is cheaper than two thread hand-offs.
            receipt = self._append_inline(fields, float_free)
            if receipt is not None:
                self._maybe_checkpoint(loop)
                return receipt
        fut: asyncio.Future[AuditReceipt] = loop.create_future()

        def setup(entry: _Entry) -> None:
            entry.future, entry.loop = fut, loop

        self._chain_and_enqueue(fields, KIND_EVENT, setup, float_free=float_free)
        self._maybe_checkpoint(loop)
        return await fut

    def append_later(self, event: Mapping[str, Any]) -> None:
        """Chain and queue ``event`` now; write it with the next batch, unawaited.

        For a record that follows an answer already given (the credential
        proxy's ``proxy.completed``: the call's decision was made durable
        before it): it needs no write and fsync of its own. It is written,
        in chain order, with the next record someone waits for (inline or
        by the writer), or by the writer at most ``LATER_S`` after it was
        queued; at close, before the final checkpoint. Raises like
        :meth:`append` for an event that cannot be logged or a closed log;
        a later write failure is the log's (it fails and poisons as usual).
        """
        fields, float_free = checked_event(event)
        with self._cond:
            if self._stopping:
                raise AuditError("audit log is closed")
            entry = self._chain_locked(fields, KIND_EVENT, float_free=float_free)
            self._queue.append(entry)
            if self._later_due is None:
                self._later_due = time.monotonic() + LATER_S
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is None:  # no loop here: the writer waits for the due time itself
                self._cond.notify()
                return
            if self._later_loop is loop:  # a timer is pending already
                return
            self._later_loop = loop
        # Nothing wakes the writer now: usually the next awaited record takes
        # this one along. One loop timer at a time checks when it is due (a
        # notify per record cost a writer wake-up and a GIL hand-off per call).
        loop.call_later(LATER_S, self._later_tick)

    def _later_tick(self) -> None:
        """Loop timer: wake an idle writer for records of append_later now due."""
        with self._cond:
            due = self._later_due
            left = due - time.monotonic() if due is not None else 0.0
            if due is not None and left > 0.001:  # taken since, and newer ones queued
                asyncio.get_running_loop().call_later(left, self._later_tick)
                return
            self._later_loop = None
            if due is not None and not self._busy and not self._wanted:
                self._cond.notify()

    def _append_inline(self, fields: dict[str, Any], float_free: bool) -> AuditReceipt | None:
        """Write and fsync on the calling (event loop) thread when nothing could share it.

        ``solo()`` says no other call is in flight, so no other record could
        join this fsync's batch and nothing else would run while we wait:
        handing the record to the writer thread and back would only add two
        thread wake-ups (~140 µs measured) to the caller's latency. Returns
        None (caller queues as usual) when the writer is busy or has work.
        """
        with self._cond:
            if self._busy or self._wanted or self._stopping:
                return None
            entry = self._chain_locked(fields, KIND_EVENT, float_free=float_free)
            batch = self._take_batch()  # append_later's records go first, in chain order
            batch.append(entry)
        try:
            self._write_batch(batch)
        except BaseException as exc:
            failed = self._after_failure(batch, exc)
            self._release_busy()
            self._complete(failed, exc)  # anything queued meanwhile fails too
            raise _audit_error(exc) from exc
        self._release_busy()
        return entry.receipt

    def _release_busy(self) -> None:
        with self._cond:
            self._busy = False
            if self._queue or self._stopping:
                self._cond.notify()

    def append_sync(self, event: Mapping[str, Any]) -> AuditReceipt:
        """Blocking :meth:`append` for start/stop events and tools.

        Safe from any thread. On the event loop thread it blocks the loop until
        the fsync, which is fine for start/stop but not for request handling.
        """
        return self._append_blocking(check_event(event), KIND_EVENT)

    def _append_blocking(self, fields: dict[str, Any], kind: str, *,
                         internal: bool = False, epoch: int | None = None) -> AuditReceipt:
        done = threading.Event()

        def setup(entry: _Entry) -> None:
            entry.event = done

        entry = self._chain_and_enqueue(fields, kind, setup, internal=internal, epoch=epoch)
        done.wait()
        if entry.error is not None:
            raise _audit_error(entry.error)
        return entry.receipt

    # -- the writer thread ------------------------------------------------------

    def _writer_main(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    if not self._queue or self._busy:
                        self._cond.wait()
                    elif self._wanted:
                        break
                    else:  # only append_later's records: write them when due
                        left = (self._later_due or 0.0) - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                while self._busy:  # stopping: let an inline append finish first
                    self._cond.wait()
                if not self._queue:
                    return
                gather = self._should_gather()
                if not gather:
                    batch = self._take_batch()
            if gather:
                time.sleep(self.commit_delay)  # without the lock: appends go on
                with self._cond:
                    batch = self._take_batch()
            error: BaseException | None = None
            try:
                self._write_batch(batch)
            except BaseException as exc:  # never leave a waiter hanging
                batch = self._after_failure(batch, exc)
                error = exc
            with self._cond:
                self._busy = False
            self._complete(batch, error)

    def _take_batch(self) -> list[_Entry]:
        """Everything queued, and the file with it (caller holds ``_cond``)."""
        batch, self._queue = self._queue, []
        self._wanted = 0
        self._later_due = None
        self._busy = True
        return batch

    def _should_gather(self) -> bool:
        """Wait commit_delay for more records? Only when enough calls are on their way.

        ``in_flight() - queued`` counts calls being handled whose records are
        not queued yet (approximately: read without the loop's lock). With one
        or two, waiting mostly idles the daemon (measured: -15 % at 2
        clients); with GATHER_MIN_OTHERS or more, a few records join the batch.
        Caller holds ``_cond``.
        """
        if self.commit_delay <= 0 or self._stopping or self.in_flight is None:
            return False
        queued = self._wanted
        return queued < GATHER_ENOUGH and self.in_flight() - queued >= GATHER_MIN_OTHERS

    def _write_batch(self, batch: list[_Entry]) -> None:
        if self._size > 0 and self._rotation_due():
            self._rotate(batch[0].receipt.seq)
        data = b"".join([e.line for e in batch])
        cut = next((i for i, e in enumerate(batch) if e.kind == KIND_CHECKPOINT), None)
        # "write" mode covers the per-request records (append); blocking
        # appends (start/stop, key lifecycle, registry intents) stay durable.
        sync = not self._write_mode or any(e.event is not None for e in batch)
        if cut is not None and (cut > 0 or self._write_mode):
            # Seal order: what a checkpoint seals reaches the disk before the
            # checkpoint's bytes are even written, so a power loss can tear an
            # unsealed tail but never leave a seal over a torn record.
            head = len(b"".join([e.line for e in batch[:cut]]))
            self._write_all(data[:head])
            self._sync_fd()
            self._write_all(data[head:])
            sync = True
        else:
            self._write_all(data)
        if sync:
            self._sync_fd()
        last = batch[-1]
        with self._cond:
            self._size += len(data)
            self._durable = _Head(last.receipt.seq, last.receipt.hash, last.dt, last.kind)
        self.stats.batches += 1
        self.stats.records += len(batch)
        with self._sync_cv:
            self._written_seq = last.receipt.seq
            if sync:
                self.stats.synced_seq = max(self.stats.synced_seq, last.receipt.seq)
            else:
                self._sync_cv.notify()  # the syncer makes it durable within sync_delay
        if self._mirror is not None:
            self._mirror_q.put(data)  # after fsync ("write" mode: after the write)

    def _write_all(self, data: bytes) -> None:
        written = 0
        while written < len(data):
            n = self._write(self._fd, data[written:] if written else data)
            if n <= 0:
                raise OSError(errno.EIO, "write returned 0")
            written += n

    def _sync_fd(self) -> None:
        try:
            with self._sync_lock:
                self._fsync(self._fd)
        except OSError as exc:
            raise _FsyncError(exc) from exc

    def _syncer_main(self) -> None:
        """ "write" mode: sync what was written, at most ``sync_delay`` after it was.

        Waits for a written-but-unsynced record, lets ``sync_delay`` pass
        (everything written meanwhile shares the one sync), then syncs. A
        failed sync poisons the log like a failed inline fsync: the kernel
        may have dropped the pages, so acknowledged records may be lost and
        nothing more is acknowledged until a restart.
        """
        delay = self.config.sync_delay
        while True:
            with self._sync_cv:
                while self._written_seq <= self.stats.synced_seq and not self._sync_stop:
                    self._sync_cv.wait()
                if self._written_seq <= self.stats.synced_seq:
                    return  # stopping, nothing left unsynced
                if not self._sync_stop:
                    self._sync_cv.wait(delay)  # woken early only by close()
                target = self._written_seq
            try:
                with self._sync_lock:
                    if self._fd < 0:
                        return
                    self._fsync(self._fd)
            except OSError as exc:
                _logger.critical("audit background sync failed; records acknowledged in the "
                                 "last %.3fs may be lost: %s", delay, exc)
                with self._cond:
                    self._poisoned = _FsyncError(exc)
                return
            with self._sync_cv:
                self.stats.synced_seq = max(self.stats.synced_seq, target)
                self.stats.syncs += 1

    def _rotation_due(self) -> bool:
        cfg = self.config
        if self._size >= cfg.rotate_bytes:
            return True
        return (cfg.rotate_seconds is not None
                and self._clock() - self._file_opened_at >= cfg.rotate_seconds)

    def _rotate(self, first_seq: int) -> None:
        """Continue the chain in a new file named after its first record."""
        old = self._path
        if self._write_mode:
            with self._sync_lock:  # the old file is complete and durable before it is closed
                try:
                    self._fsync(self._fd)
                except OSError as exc:
                    raise _FsyncError(exc) from exc
                self._open_file(self.directory / files.file_name(first_seq))
        else:
            self._open_file(self.directory / files.file_name(first_seq))
        _logger.info("audit log rotated: %s -> %s", old.name, self._path.name)

    def _after_failure(self, batch: list[_Entry], exc: BaseException) -> list[_Entry]:
        """Fail everything not durable, cut the file back, rewind the chain."""
        _logger.error("audit write failed, failing %d+ records: %s", len(batch), exc)
        with self._cond:
            failed = batch + self._queue
            self._queue = []
            self._wanted = 0
            self._later_due = None
            self._epoch += 1
            self._head = self._durable
            self._span = None  # it hashed lines the rewind discards
            self._last_event_seq = min(self._last_event_seq, self._durable.seq)
            try:
                os.ftruncate(self._fd, self._size)
                self._fsync(self._fd)
            except OSError as trunc_exc:
                _logger.error("cannot cut audit file back after failure: %s", trunc_exc)
                self._poisoned = trunc_exc
            if not isinstance(exc, OSError):
                # fsync failed (the kernel may have dropped the dirty pages, so
                # what is on disk is unknown) or something unexpected happened.
                self._poisoned = exc
        self.stats.failed += len(failed)
        return failed

    def _complete(self, batch: list[_Entry], error: BaseException | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Entry]] = {}
        for entry in batch:
            if entry.loop is not None:
                by_loop.setdefault(entry.loop, []).append(entry)
            elif entry.event is not None:
                entry.error = error
                entry.event.set()
        for loop, entries in by_loop.items():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(_resolve, entries, error)

    def _mirror_main(self) -> None:
        assert self._mirror is not None
        while (data := self._mirror_q.get()) is not None:
            try:
                self._mirror(data)
            except Exception:
                # The file is the record of truth; a failing copy is only logged.
                _logger.warning("audit mirror failed", exc_info=True)

    @property
    def problem(self) -> str | None:
        """Why records cannot be made durable any more, or None (read-only, for
        health checks; a full disk is seen by the caller with statvfs)."""
        if self._poisoned is not None:
            return f"audit log failed ({self._poisoned}); restart required"
        if self._closing or self._closed:
            return "audit log closed"
        return None

    # -- checkpoints ------------------------------------------------------------

    def _maybe_checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a background checkpoint when one is due (event loop thread only)."""
        if self._retain_timer is None and self._retention.enabled:
            self.start_retention(loop)
        if self._signer is None or self._cp_task is not None:
            return
        cfg = self.config
        due = cfg.checkpoint_records is not None and self._since_cp >= cfg.checkpoint_records
        if not due and cfg.checkpoint_seconds is not None:
            due = self._clock() - self._last_cp_at >= cfg.checkpoint_seconds
            if not due and self._cp_timer is None:
                # Seal a quiet tail too: nothing else would trigger it.
                self._cp_timer = loop.call_later(cfg.checkpoint_seconds, self._on_cp_timer, loop)
        if due:
            self._cp_task = loop.create_task(self._checkpoint_async("interval"))

    def start_retention(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm the retention timer on ``loop`` (idempotent; a no-op without limits).

        The daemon calls this at start so an idle daemon still applies the age
        limit; the first async append arms it otherwise. Loop thread only.
        """
        if self._retain_timer is None and self._retention.enabled and not self._closing:
            self._retain_timer = loop.call_later(self.config.retain_check_seconds,
                                                 self._on_retain_timer, loop)

    def _on_retain_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run retention on a worker thread, then re-arm (asyncio timers are monotonic)."""
        if self._closing:
            self._retain_timer = None
            return
        if self._retain_task is None or self._retain_task.done():
            self._retain_task = loop.run_in_executor(None, self._retain_quietly)
        self._retain_timer = loop.call_later(self.config.retain_check_seconds,
                                             self._on_retain_timer, loop)

    def _retain_quietly(self) -> list[Pruned]:
        try:
            return self.run_retention()
        except (BadgedError, OSError, ValueError) as exc:
            _logger.warning("audit retention skipped: %s", exc)
            return []

    def run_retention(self) -> list[Pruned]:
        """Apply the retention policy now (blocking; a worker thread or a tool).

        Each removal is recorded durably (``audit.pruned``) before the file is
        unlinked; see :mod:`badged.audit.retention`.
        """
        if not self._retention.enabled:
            return []
        with self._retain_lock:
            with self._cond:
                current = self._path
            return prune(self.directory, self._retention, current=current,
                         append=self.append_sync, now=self._clock())

    def _on_cp_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._cp_timer = None
        if self._cp_task is None and not self._closing:
            self._cp_task = loop.create_task(self._checkpoint_async("interval"))

    def _snapshot_for_checkpoint(self, reason: str) -> tuple[dict[str, Any], int] | None:
        with self._cond:
            head = self._head
            # Nothing new since the last seal (checkpoints need no sealing of
            # their own: sealing one only to seal the next would never end).
            if self._last_event_seq <= self._sealed_seq:
                return None
            self._since_cp = 0
            self._last_cp_at = self._clock()
            assert self._signer_kid is not None
            fields: dict[str, Any] = {
                "event": "audit.checkpoint",
                "head": head.hash,
                "head_seq": head.seq,
                "key": self._signer_kid,
                "reason": reason,
                "sealed_at": format_time(from_timestamp(self._last_cp_at)),
            }
            if self._span is not None and self._span_from <= head.seq:
                fields["span_from"] = self._span_from
                fields["span_sha256"] = self._span.hexdigest()
            self._span, self._span_from = hashlib.sha256(), head.seq + 1
            return fields, self._epoch

    def _sign(self, fields: dict[str, Any]) -> dict[str, Any]:
        assert self._signer is not None
        fields["sig"] = encode_sig(self._signer.sign(checkpoint_statement(fields), _ES256))
        return fields

    def _sealed(self, fields: Mapping[str, Any]) -> None:
        with self._cond:
            self._sealed_seq = max(self._sealed_seq, int(fields["head_seq"]))
        self.stats.checkpoints += 1

    async def _checkpoint_async(self, reason: str) -> None:
        try:
            await self.checkpoint(reason)
        except (BadgedError, OSError, ValueError, RuntimeError) as exc:
            # The chain is intact without it; the next trigger or close() seals.
            # (RuntimeError: the sign pool was shut down by a concurrent close.)
            _logger.warning("audit checkpoint skipped: %s", exc)
        finally:
            self._cp_task = None

    async def checkpoint(self, reason: str = "manual") -> AuditReceipt | None:
        """Sign the current head with the device key and append the checkpoint.

        Returns None when there is no signer or nothing new to seal. Signing
        runs on its own thread so the loop keeps serving (TPMs are slow).
        """
        if self._signer is None:
            return None
        snap = self._snapshot_for_checkpoint(reason)
        if snap is None:
            return None
        fields, epoch = snap
        loop = asyncio.get_running_loop()
        fields = await loop.run_in_executor(self._sign_pool, self._sign, fields)
        fut: asyncio.Future[AuditReceipt] = loop.create_future()

        def setup(entry: _Entry) -> None:
            entry.future, entry.loop = fut, loop

        self._chain_and_enqueue(fields, KIND_CHECKPOINT, setup, epoch=epoch)
        receipt = await fut
        self._sealed(fields)
        return receipt

    def checkpoint_sync(self, reason: str = "manual") -> AuditReceipt | None:
        """Blocking :meth:`checkpoint` (signs on the calling thread)."""
        return self._checkpoint_blocking(reason, internal=False)

    def _checkpoint_blocking(self, reason: str, *, internal: bool) -> AuditReceipt | None:
        if self._signer is None:
            return None
        snap = self._snapshot_for_checkpoint(reason)
        if snap is None:
            return None
        fields, epoch = snap
        self._sign(fields)
        receipt = self._append_blocking(fields, KIND_CHECKPOINT, internal=internal, epoch=epoch)
        self._sealed(fields)
        return receipt

    # -- closing ----------------------------------------------------------------

    def close(self) -> None:
        """Seal with a final checkpoint, drain the queue, stop the writer.

        Blocking; from the event loop use :meth:`aclose`. Idempotent.
        """
        with self._cond:
            if self._closed or self._closing:
                return
            self._closing = True
        if self._signer is not None and self._poisoned is None:
            try:
                self._checkpoint_blocking("close", internal=True)
            except (BadgedError, OSError, ValueError) as exc:
                _logger.error("final audit checkpoint failed: %s", exc)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._sync_thread is not None:  # its last sync covers every written record
            with self._sync_cv:
                self._sync_stop = True
                self._sync_cv.notify_all()
            self._sync_thread.join()
        if self._mirror_thread is not None:
            self._mirror_q.put(None)
            self._mirror_thread.join()
        if self._sign_pool is not None:
            self._sign_pool.shutdown(wait=True)
        self._release_lock()
        with self._cond:
            self._closed = True

    async def aclose(self) -> None:
        """Close from the event loop: finish a running checkpoint, then :meth:`close`."""
        if self._cp_timer is not None:
            self._cp_timer.cancel()
            self._cp_timer = None
        if self._retain_timer is not None:
            self._retain_timer.cancel()
            self._retain_timer = None
        if self._retain_task is not None:
            with contextlib.suppress(Exception):
                await self._retain_task
        task = self._cp_task
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    @property
    def head(self) -> AuditReceipt:
        """Seq and hash of the last record made durable (for status and tests)."""
        with self._cond:
            d = self._durable
        return AuditReceipt(d.seq, d.hash, format_time(d.dt) if d.dt else "")

    @property
    def current_file(self) -> Path:
        """The file records are currently appended to."""
        return self._path


# -- recovery helpers (run once, at open) ------------------------------------------


@dataclass
class _Scan:
    head: _Head | None = None  # last valid record
    good_end: int = 0  # byte length of the valid prefix
    reason: str | None = None  # why the rest must be cut (None: nothing to cut)
    lineno: int = 0  # first cut line
    sealed_seq: int = 0
    last_event_seq: int = 0


def _scan_tail_file(path: Path) -> _Scan:
    """Validate the last file; find where its valid prefix ends.

    Only checks what a crash can break -- each record's own integrity and its
    link to the line before; older history is ``verify``'s job, not the
    daemon's startup path.
    """
    fast = _scan_tail_fast(path)
    return fast if fast is not None else _scan_tail_records(path)


def _scan_tail_records(path: Path) -> _Scan:
    """:func:`_scan_tail_file` record by record: says where and why to cut."""
    scan = _Scan()
    for line in files.iter_lines(path):
        head = scan.head
        if not line.complete:
            scan.reason = "torn last line (no newline)"
        else:
            try:
                rec = parse_line(line.data)
            except RecordError as exc:
                scan.reason = f"invalid record: {exc.message}"
            else:
                if head is not None and (rec["seq"] != head.seq + 1
                                         or rec["prev"] != head.hash):
                    scan.reason = "record does not link to the one before"
        if scan.reason is not None:
            scan.lineno = line.lineno
            return scan
        scan.head = _Head(rec["seq"], rec["hash"], parse_time(rec["time"]), rec["kind"])
        scan.good_end = line.offset + len(line.data)
        if rec["kind"] == KIND_CHECKPOINT and isinstance(rec.get("head_seq"), int):
            scan.sealed_seq = max(scan.sealed_seq, rec["head_seq"])
        else:
            scan.last_event_seq = rec["seq"]
    return scan


def _scan_tail_fast(path: Path) -> _Scan | None:
    """:func:`_scan_tail_file`'s answer for a file with nothing to cut, from
    ``audit verify``'s chunk scanner; None for anything else (the record path
    then finds what to cut and why).

    Record by record, start-up took ~40 µs a record: ~0.2 s after creating
    1,000 agents, up to ~1.5 s for a full 16 MiB file (issue 22). The chunk
    scanner checks each record's integrity (canonical form, hash) and its
    link to the line before, as the record path does, and refuses a torn
    last line; only the last record is parsed here for its time and kind.
    """
    from badged.audit.verify import _scan_file

    try:
        size = path.stat().st_size
    except OSError:
        return None
    if size == 0:
        return _Scan()
    fast = _scan_file(str(path), 0, None, chunk=256 * 1024)
    last = files.read_last_line(path)
    if fast is None or fast.records == 0 or last is None:
        return None
    try:
        rec = parse_line(last)
    except RecordError:
        return None
    if rec["seq"] != fast.last_seq or rec["hash"] != fast.last_hash:
        return None  # the file changed under the scan: the record path decides
    scan = _Scan(head=_Head(rec["seq"], rec["hash"], parse_time(rec["time"]), rec["kind"]),
                 good_end=size)
    checkpoints = {seq for seq, _head_seq, _head, _found in fast.checkpoints}
    scan.sealed_seq = max((head_seq for _seq, head_seq, _head, _found in fast.checkpoints),
                          default=0)
    event = fast.last_seq
    while event in checkpoints:
        event -= 1
    scan.last_event_seq = event if event >= fast.first_seq else 0
    return scan


def _head_before(paths: list[Path]) -> _Head:
    """Chain head from earlier files when the last one has no valid record."""
    for path in reversed(paths):
        raw = files.read_last_line(path)
        if raw is None:
            continue
        try:
            rec = parse_line(raw)
        except RecordError as exc:
            raise AuditError(
                f"last record of {path.name} is invalid ({exc.message}); "
                "run 'badgectl audit verify' before restarting"
            ) from None
        return _Head(rec["seq"], rec["hash"], parse_time(rec["time"]), rec["kind"])
    return _Head(0, GENESIS, None)


def _write_file_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, files.FILE_MODE)
    try:
        os.fchmod(fd, files.FILE_MODE)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
