"""``badgectl audit``: read, verify and export the audit log from its directory.

Unlike the other command groups this one does not talk to the daemon: the log
must be checkable offline, on a copy, by someone who does not trust the host
that wrote it. It imports ``badged.audit`` lazily, inside each command, so the
rest of ``badgectl`` does not pay for it.

Exit codes: 0 ok, 1 verification failed (first bad record printed; this
includes a crash-recovery cut that holds records a checkpoint had sealed, or
whose cut-off bytes are gone: ``sealed_cut``, ``cut_missing``), 2 usage (bad
option, missing directory, unreadable key).

Examples::

    badgectl audit tail --dir /var/lib/badged/audit -n 50 --agent deploy-bot
    badgectl audit tail --dir /var/lib/badged/audit --follow --json
    badgectl audit verify --dir /var/lib/badged/audit --pubkey /var/lib/badged/device-key.pem
    badgectl audit export --dir /var/lib/badged/audit --from 1000 > audit.jsonl
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

_logger = logging.getLogger(__name__)

DEFAULT_DIR = "/var/lib/badged/audit"
EXIT_FAILED = 1
EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., Any])


def _dir_option(func: F) -> F:
    # Required, no default: on a host with several daemons (or a copy being
    # checked) silently reading /var/lib/badged/audit would show another log.
    return click.option(
        "--dir", "directory", envvar="BADGED_AUDIT_DIR", required=True,
        type=click.Path(file_okay=False, dir_okay=True, exists=True, path_type=Path),
        help=f"Audit log directory, e.g. {DEFAULT_DIR} [env BADGED_AUDIT_DIR; required].",
    )(func)


_HUMAN_FIELDS = ("agent", "decision", "rule", "jti", "reason", "head_seq")


def _human(rec: dict[str, Any]) -> str:
    """One line per record: the fields an operator scans for, in a fixed order."""
    parts = [f"{rec.get('seq', '?'):>8}", str(rec.get("time", "")), f"{rec.get('event', '?'):<24}"]
    for name in _HUMAN_FIELDS:
        if name in rec:
            parts.append(f"{name}={rec[name]}")
    caller = rec.get("caller")
    if isinstance(caller, dict):
        who = ",".join(f"{k}={caller[k]}" for k in ("uid", "pid", "unit") if k in caller)
        if who:
            parts.append(f"caller[{who}]")
    if "clock_backwards_s" in rec:
        parts.append(f"CLOCK-BACKWARDS={rec['clock_backwards_s']}s")
    return " ".join(parts)


def _emit(rec: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rec, sort_keys=True, separators=(",", ":")))
    else:
        click.echo(_human(rec))


def _load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A PEM public key or a PEM certificate (the enrolled device cert)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}",
                                 param_hint="--pubkey") from None
    try:
        if b"CERTIFICATE" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise click.BadParameter(f"{path} is not a PEM public key or certificate: {exc}",
                                 param_hint="--pubkey") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise click.BadParameter(f"{path}: not an EC public key", param_hint="--pubkey")
    return key


@click.group("audit")
def audit_group() -> None:
    """Read, verify and export the audit log (offline, from its directory)."""


@audit_group.command("tail")
@click.option("--lines", "-n", default=20, show_default=True, type=click.IntRange(min=0),
              help="How many of the last matching records to show first.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records as they arrive.")
@click.option("--agent", default=None, help="Only records of this agent.")
@click.option("--event", "events", multiple=True,
              help="Only events whose name starts with this; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--poll-interval", default=0.5, hidden=True, type=click.FloatRange(min=0.01))
@_dir_option
def tail_cmd(lines: int, follow: bool, agent: str | None, events: tuple[str, ...],
             as_json: bool, poll_interval: float, directory: Path) -> None:
    """Show the last records, optionally following the log like ``tail -f``."""
    from badged.audit import reader

    ev = list(events) or None
    # Fix the follow point before printing anything, so a record appended
    # while we print is neither lost nor shown twice.
    newest = reader.tail(directory, 1)
    last_seq = int(newest[0]["seq"]) if newest else 0
    for rec in reader.tail(directory, lines, agent=agent, events=ev):
        if int(rec["seq"]) <= last_seq:
            _emit(rec, as_json)
    sys.stdout.flush()
    if not follow:
        return
    try:
        for rec in reader.follow(directory, after_seq=last_seq, agent=agent, events=ev,
                                 poll_interval=poll_interval):
            _emit(rec, as_json)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


@audit_group.command("verify")
@click.option("--from", "from_seq", type=click.IntRange(min=1), default=None,
              help="Start at this seq (trusting its link to the one before).")
@click.option("--pubkey", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Device public key or certificate (PEM) to check checkpoint signatures.")
@click.option("--strict", is_flag=True,
              help="Also fail on records after the last checkpoint and on a torn tail.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_dir_option
def verify_cmd(from_seq: int | None, pubkey: Path | None, strict: bool, as_json: bool,
               directory: Path) -> None:
    """Check the hash chain and checkpoint signatures; point at the first bad record."""
    from dataclasses import asdict

    from badged.audit.verify import verify

    key = _load_public_key(pubkey) if pubkey is not None else None
    report = verify(directory, key, from_seq=from_seq, strict=strict)
    if as_json:
        click.echo(json.dumps(asdict(report), sort_keys=True, indent=2))
    else:
        click.echo(report.summary())
    if report.first_bad is not None:
        bad = report.first_bad
        if not as_json:
            click.echo(f"first bad record: {bad.file} line {bad.line} seq {bad.seq}: {bad.reason}",
                       err=True)
        sys.exit(EXIT_FAILED)


@audit_group.command("export")
@click.option("--from", "from_seq", type=click.IntRange(min=1), default=None,
              help="First seq to export.")
@click.option("--agent", default=None, help="Only records of this agent.")
@click.option("--event", "events", multiple=True,
              help="Only events whose name starts with this; repeatable.")
@click.option("--output", "-o", type=click.File("wb"), default="-", show_default=True,
              help="Write here instead of stdout.")
@click.option("--json", "as_json", is_flag=True, help="Accepted for consistency: the output "
              "is always JSON Lines.")
@_dir_option
def export_cmd(from_seq: int | None, agent: str | None, events: tuple[str, ...],
               output: Any, as_json: bool, directory: Path) -> None:
    """Write records as JSON Lines for a SIEM (stored bytes, so hashes still check)."""
    from badged.audit import reader

    count = reader.export(directory, output, from_seq=from_seq, agent=agent,
                          events=list(events) or None)
    output.flush()
    _logger.info("exported %d audit records", count)


# -- trace (issue 21) --------------------------------------------------------------------

# What each linked record is, in the order a chain is told.
_ROLES = (("grant.", "grant"), ("delegation.", "delegation"), ("approval.", "approval"),
          ("status.", "revocation"))


def _role(rec: dict[str, Any]) -> str:
    event = str(rec.get("event", ""))
    for prefix, role in _ROLES:
        if event.startswith(prefix):
            return role
    if event.endswith(".denied") or event.endswith(".withheld"):
        return "denied"
    return "credential"


def _seeds(rec: dict[str, Any], wanted: str) -> bool:
    """Whether ``rec`` is one of the credentials the id names: its transaction
    id, its token's jti, or the W3C trace id (or traceparent) it joined."""
    if wanted in (rec.get("txn"), rec.get("jti")):
        return True
    tp = rec.get("traceparent")
    return isinstance(tp, str) and (tp == wanted or tp[3:35] == wanted)


# Bounds of trace_records' one pass (memory does not grow with the log):
# the log is read in blocks of TRACE_BLOCK bytes (complete lines), searched
# in C for the bytes that can matter, and only matching lines are parsed.
# Kept: lifecycle records (grant./approval./delegation./status.marked) not
# yet known to be linked, since the ones a credential links to may come
# before it (~1 KB each parsed: ~50 MB at the cap); the previous block, to
# find the records of a transaction that came before the one naming a jti
# (one call's records sit close together; its approval records are
# lifecycle records anyway); and the records output.
TRACE_BLOCK = 4 << 20
TRACE_LINKED_MAX = 50_000
TRACE_OUT_MAX = 10_000
_LIFECYCLE = (b'"event":"grant.', b'"event":"approval.', b'"event":"delegation.',
              b'"event":"status.marked"')  # as the daemon writes them (compact JSON)


def _lifecycle(rec: dict[str, Any]) -> bool:
    return str(rec.get("event", "")).startswith(("grant.", "approval.", "delegation.",
                                                 "status.marked"))


def _linked(rec: dict[str, Any], links: dict[str, set[str]], agents: set[str]) -> bool:
    """Whether a lifecycle record is about an approval, grant or delegation the
    chain used, or marks the tokens of its agent revoked."""
    return any(rec.get(name) in ids for name, ids in links.items() if ids) or (
        rec.get("event") == "status.marked" and rec.get("revoked") == "agent"
        and rec.get("agent") in agents)


def _parse_line(data: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("seq"), int) else None


def _blocks(path: Path) -> Iterator[bytes]:
    """``path`` in blocks of complete lines (a torn last line is left out)."""
    with open(path, "rb") as fh:
        rest = b""
        while chunk := fh.read(TRACE_BLOCK):
            buf = rest + chunk if rest else chunk
            cut = buf.rfind(b"\n") + 1
            if cut:
                yield buf[:cut]
            rest = buf[cut:]


def _line_starts(block: bytes, needles: list[bytes], begin: int) -> set[int]:
    """Where the lines of ``block`` (from ``begin``) holding any of ``needles``
    start: one C ``find`` scan per needle, nothing split or decoded."""
    starts: set[int] = set()
    for n in needles:
        pos = block.find(n, begin)
        while pos >= 0:
            starts.add(block.rfind(b"\n", 0, pos) + 1)
            pos = block.find(n, block.find(b"\n", pos) + 1 or len(block))
    return starts


def _lines_with(needle: bytes, *blocks: bytes) -> Iterator[bytes]:
    """Each line of ``blocks`` containing ``needle`` (C search, no split)."""
    for block in blocks:
        pos = block.find(needle)
        while pos >= 0:
            start = block.rfind(b"\n", 0, pos) + 1
            end = block.find(b"\n", pos) + 1 or len(block)
            yield block[start:end]
            pos = block.find(needle, end)


def trace_records(directory: Path, wanted: str, *, warn: Callable[[str], None] | None = None
                  ) -> list[dict[str, Any]]:
    """The chain behind a credential: one pass over the log, bounded memory.

    Finds the credential records (and denials) of the transaction(s) the id
    names, and what they link to by id: the approval decided for them, the
    step-up grant and the delegation they used (created, revoked), and the
    status-list marks that revoked them (or their agent). Each file is read
    once, in blocks searched with ``bytes.find`` for the id, a known
    transaction id or a lifecycle event name; only those lines are parsed as
    JSON. Memory: two blocks (:data:`TRACE_BLOCK`), at most
    :data:`TRACE_LINKED_MAX` lifecycle records and :data:`TRACE_OUT_MAX`
    output records, whatever the log's size; ``warn`` is told when a bound
    dropped something.
    """
    import heapq
    from collections import deque

    from badged.audit import files
    from badged.errors import ConfigError

    if not directory.is_dir():
        raise ConfigError("audit directory not found", path=str(directory))
    needle = wanted.encode("utf-8", "replace")
    if not needle:
        return []  # an empty id would match every line
    txns: set[str] = set()
    txn_needles: list[bytes] = []
    links: dict[str, set[str]] = {"approval": set(), "grant": set(), "delegation": set()}
    agents: set[str] = set()
    out: dict[int, dict[str, Any]] = {}
    linked: deque[dict[str, Any]] = deque(maxlen=TRACE_LINKED_MAX)
    dropped = {"linked": 0, "out": 0}

    def take(rec: dict[str, Any]) -> None:
        if len(out) >= TRACE_OUT_MAX:
            dropped["out"] += 1
            return
        out[int(rec["seq"])] = rec
        for name in links:
            value = rec.get(name)
            if isinstance(value, str):
                links[name].add(value)
        request = rec.get("request")
        if isinstance(request, dict) and isinstance(request.get("delegation"), str):
            links["delegation"].add(request["delegation"])
        if isinstance(rec.get("agent"), str) and rec.get("event") == "token.issued":
            agents.add(rec["agent"])

    previous = b""
    for path in files.list_files(directory):
        for block in _blocks(path):
            heap = sorted(_line_starts(block, [needle, *txn_needles, *_LIFECYCLE], 0))
            seen = set(heap)
            while heap:
                start = heapq.heappop(heap)
                end = block.find(b"\n", start) + 1 or len(block)
                line = block[start:end]
                rec = _parse_line(line)
                if rec is None:
                    continue
                txn = rec.get("txn")
                if needle in line and _seeds(rec, wanted) and isinstance(txn, str) \
                        and txn not in txns:
                    txns.add(txn)
                    t = txn.encode()
                    txn_needles.append(t)
                    for earlier in _lines_with(t, previous, block[:start]):
                        prev = _parse_line(earlier)  # the transaction's records before
                        if prev is not None and prev.get("txn") == txn:
                            take(prev)
                    for later in _line_starts(block, [t], end) - seen:
                        seen.add(later)
                        heapq.heappush(heap, later)
                if txn in txns:
                    take(rec)
                elif _lifecycle(rec):
                    if _linked(rec, links, agents):
                        take(rec)  # links known already: no need to keep it
                    else:
                        if len(linked) == linked.maxlen:
                            dropped["linked"] += 1
                        linked.append(rec)
            previous = block
    if not txns:
        return []
    for rec in linked:
        if int(rec["seq"]) not in out and _linked(rec, links, agents):
            take(rec)
    if warn is not None and (dropped["linked"] or dropped["out"]):
        warn(f"trace bounded: {dropped['linked']} older grant/approval/delegation records "
             f"not kept, {dropped['out']} records over {TRACE_OUT_MAX} not shown")
    return [out[seq] for seq in sorted(out)]


def _chain_lines(records: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for rec in records:
        role = _role(rec)
        lines.append(f"{role:<11} {_human(rec)}")
        if role in ("credential", "denied"):
            request = rec.get("request")
            if isinstance(request, dict):
                lines.append(f"{'':<11}   request: " + " ".join(
                    f"{k}={v}" for k, v in request.items() if v not in (None, "", [])))
            if "context" in rec:
                ctx = rec["context"]
                text = ",".join(f"{k}={v}" for k, v in ctx.items()) if isinstance(ctx, dict) \
                    else str(ctx)
                lines.append(f"{'':<11}   context (asserted by the agent): {text}")
            caller = rec.get("caller")
            if isinstance(caller, dict):
                lines.append(f"{'':<11}   process: " + " ".join(
                    f"{k}={caller[k]}" for k in ("pid", "uid", "exe", "exe_sha256", "unit")
                    if caller.get(k)))
            for name in ("bundle", "grant", "approval", "delegation", "kid", "status_idx",
                         "txn", "traceparent"):
                if rec.get(name) not in (None, ""):
                    lines.append(f"{'':<11}   {name}: {rec[name]}")
    return lines


@audit_group.command("trace")
@click.argument("ident")
@click.option("--json", "as_json", is_flag=True, help="The linked records as JSON Lines.")
@_dir_option
def trace_cmd(ident: str, as_json: bool, directory: Path) -> None:
    """The chain behind a credential: request, process, rule, grant, approval,
    delegation, credential, revocation.

    IDENT: a transaction id (the token's ``txn`` claim), a token's jti, or a
    W3C trace id / traceparent the caller passed (all credentials of that trace).
    """
    records = trace_records(directory, ident.strip(),
                            warn=lambda msg: click.echo(f"badgectl: {msg}", err=True))
    if not records:
        click.echo(f"no credential with txn, jti or trace id {ident!r} in {directory}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        for rec in records:
            _emit(rec, True)
        return
    for line in _chain_lines(records):
        click.echo(line)
