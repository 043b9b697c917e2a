"""``python -m badgebench [--quick]``: normally run through ``bash bench/run``."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from badgebench import durability, host, kit, procfs, provision, report, ssh
from badgebench.ceiling import run_ceiling
from badgebench.load import LoadResult, run_load
from badgebench.ops import OpSpec, ecdsa_blob, ssh_identities
from badgebench.paired import run_paired
from badgebench.report import Report, Row
from badgebench.servers import Badged, P11KitServer, SshAgent, Unavailable

REPO = Path(__file__).resolve().parents[2]
GROUPS = ("openssl", "inprocess", "ssh-agent", "p11-kit", "badged", "proxy", "ssh", "kit")
AUDIENCE = "https://api.example.com"  # granted by `badged dev`'s generated policy
BADGED_AGENT = "demo-agent"


@dataclass(frozen=True)
class Plan:
    mode: str
    duration_s: float
    slice_s: float
    warmup_s: float
    openssl_seconds: int
    inprocess: tuple[int, ...]
    ssh_agent: tuple[int, ...]
    p11kit: tuple[int, ...]
    badged: tuple[int, ...]
    badgeclient: tuple[int, ...]
    rss_requests: int
    rss_clients: int
    pair_rounds: int = 0
    pair_duration_s: float = 3.0
    ceiling_rounds: int = 0
    durability_rounds: int = 0


FULL = Plan(mode="full", duration_s=5.0, slice_s=1.0, warmup_s=1.0, openssl_seconds=3,
            inprocess=(1, 2), ssh_agent=(1, 4, 16, 64), p11kit=(1, 4, 16),
            badged=(1, 4, 16, 64), badgeclient=(1, 16), rss_requests=100_000, rss_clients=16,
            pair_rounds=5, pair_duration_s=2.0, ceiling_rounds=3, durability_rounds=3)
QUICK = Plan(mode="quick", duration_s=1.0, slice_s=0.5, warmup_s=0.3, openssl_seconds=1,
             inprocess=(1, 2), ssh_agent=(1, 16), p11kit=(1, 16), badged=(1, 4, 16),
             badgeclient=(1,), rss_requests=2_000, rss_clients=4, pair_rounds=0)


def _say(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def _tool_version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    return (p.stdout or p.stderr).strip().splitlines()[0][:100] if (p.stdout or p.stderr) else "?"


def _git_rev(src: Path = REPO) -> str:
    if src != REPO:  # e.g. a `git archive` export: no git metadata of its own
        head = _git_rev()
        return f"{head.removesuffix('+dirty')} (this repo's HEAD at run time; daemon from {src})"
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "daemon",
                                "clients"], capture_output=True, text=True, timeout=10,
                               check=False).stdout
    except OSError:
        return "unknown"
    return rev.strip() + ("+dirty" if dirty.strip() else "")


def _versions(src: Path = REPO) -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "kernel": platform.release(),
           "openssl": _tool_version(["openssl", "version"]),
           "openssh": _tool_version(["ssh", "-V"]),
           "softhsm": _tool_version(["softhsm2-util", "--version"]),
           "badged_commit": _git_rev(src)}  # "+dirty": daemon/ or clients/ had local edits
    for pkg in ("grpcio", "python-pkcs11", "cryptography"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _load_row(rows: list[Row], group: str, label: str, clients: int, specs: list[OpSpec],
              plan: Plan, server_pid: int | None = None, note: str = "") -> Row:
    _say(f"{label}: {clients} client process(es), {plan.duration_s:g}s")
    res = run_load(specs, clients, duration_s=plan.duration_s, slice_s=plan.slice_s,
                   warmup_s=plan.warmup_s, server_pid=server_pid)
    row = Row(group=group, label=label, clients=clients, result=res, note=note, error=res.error)
    if row.error:
        _say(f"  -> error: {row.error}")
    else:
        _say(f"  -> {row.rate:,.0f} ops/s, p50 {res.p50_us:,.0f} µs, p99 {res.p99_us:,.0f} µs, "
             f"load-gen CPU {res.loadgen_cpu_cores:.2f} cores")
    rows.append(row)
    return row


def _unavailable(rows: list[Row], group: str, label: str, reason: str) -> None:
    _say(f"{label}: not available ({reason})")
    rows.append(Row(group=group, label=label, clients=0, error=reason))


def bench_openssl(rows: list[Row], plan: Plan) -> None:
    if shutil.which("openssl") is None:
        _unavailable(rows, "openssl", "openssl speed ecdsap256", "openssl not installed")
        return
    _say(f"openssl speed ecdsap256, {plan.openssl_seconds}s")
    p = subprocess.run(["openssl", "speed", "-elapsed", "-seconds", str(plan.openssl_seconds),
                        "ecdsap256"], capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r"256 bits ecdsa \(nistp256\)\s+([\d.]+)s\s+([\d.]+)s\s+([\d.]+)\s+([\d.]+)",
                  p.stdout)
    if not m:
        _unavailable(rows, "openssl", "openssl speed ecdsap256", "could not parse its output")
        return
    rate = float(m.group(3))
    # openssl prints only a rate: p50 here is its mean time per signature.
    res = LoadResult(clients=1, ops_per_s=rate, median_slice_ops_per_s=rate,
                     p50_us=1e6 / rate if rate else 0.0, loadgen_cpu_cores=1.0)
    rows.append(Row(group="openssl", label="openssl speed ecdsap256", clients=1, result=res,
                    note="one core; C loop, no latency distribution (p50 = mean)"))
    _say(f"  -> {rate:,.0f} signs/s")


def bench_peers(rows: list[Row], plan: Plan, token: provision.Token, key: str, public_der: str,
                groups: set[str]) -> None:
    pk = {"module": token.module, "token": token.label, "pin_file": str(token.pin_file),
          "key": key, "public_der": public_der}
    if "openssl" in groups:
        bench_openssl(rows, plan)
        for n in (1, 2):
            _load_row(rows, "crypto", "cryptography (OpenSSL) sign, in-process", n,
                      [OpSpec("crypto")], plan, note="software key: the CPU limit")
    if "inprocess" in groups:
        for n in plan.inprocess:
            _load_row(rows, "inprocess", "python-pkcs11 in-process", n,
                      [OpSpec("pkcs11", pk, token.env)], plan,
                      note="CKM_ECDSA on a SHA-256 digest; one session per process")
    if "ssh-agent" in groups:
        agent = SshAgent(token)
        try:
            agent.start()
            ids = ssh_identities(str(agent.socket))
            want = ecdsa_blob(public_der)
            if not any(blob == want for blob, _ in ids):
                raise Unavailable(f"key {key} not among the agent's {len(ids)} identities")
            spec = OpSpec("ssh-agent", {"socket": str(agent.socket), "blob": want.hex(),
                                        "public_der": public_der})
            for n in plan.ssh_agent:
                _load_row(rows, "ssh-agent", "ssh-agent + PKCS#11 sign", n, [spec], plan,
                          server_pid=agent.pid)
        except (Unavailable, OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            _unavailable(rows, "ssh-agent", "ssh-agent + PKCS#11 sign", str(exc))
        finally:
            agent.stop()
    if "p11-kit" in groups:
        client = provision.find_first(provision.P11KIT_CLIENT_GLOBS)
        server = P11KitServer(token)
        try:
            if client is None:
                raise Unavailable("p11-kit-client.so not found (apt-get install -y p11-kit)")
            server.start()
            spec = OpSpec("pkcs11", dict(pk, module=client),
                          {"P11_KIT_SERVER_ADDRESS": server.address})
            for n in plan.p11kit:
                _load_row(rows, "p11-kit", "p11-kit server remoting", n, [spec], plan,
                          server_pid=server.pid)
        except (Unavailable, OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            _unavailable(rows, "p11-kit", "p11-kit server remoting", str(exc))
        finally:
            server.stop()


def bench_badged(rep: Report, plan: Plan, state: Path, cold_start: float | None,
                 src: Path, external: Path | None = None, external_pid: int | None = None,
                 paired: Callable[[OpSpec, OpSpec, int | None], None] | None = None) -> None:
    rows = rep.rows
    daemon = Badged(state, src)
    try:
        try:
            import badged_proto.v1.workload_pb2  # noqa: F401 -- the workers need it
        except ImportError as exc:
            raise Unavailable(f"badged_proto not importable: {exc}") from None
        pid: int | None
        if external is not None:  # a daemon someone else runs (e.g. under a profiler)
            if not external.exists():
                raise Unavailable(f"no socket at {external}")
            sock, pid = str(external), external_pid
            rep.badged.update(external_socket=sock, external_pid=pid)
            if pid:
                rep.badged["rss_at_ready_kib"] = procfs.tree_rss_kib(pid)
        else:
            warm = daemon.start()
            pid = daemon.pid
            assert pid is not None
            rep.badged.update(start_cold_s=round(cold_start, 3) if cold_start else None,
                              start_warm_s=round(warm, 3),
                              rss_at_ready_kib=procfs.tree_rss_kib(pid),
                              command=" ".join(daemon.command()))
            _say(f"badged ready in {warm:.2f}s (cold start {cold_start or 0:.2f}s), "
                 f"RSS {rep.badged['rss_at_ready_kib']} KiB")
            sock = str(daemon.socket)
        fparams = {"socket": sock, "audience": AUDIENCE, "scopes": "read", "ttl": "60"}
        fetch = OpSpec("badged-fetch", fparams)
        sign = OpSpec("badged-sign", {"socket": sock})
        for n in plan.badged:
            _load_row(rows, "badged-fetch", "badged FetchToken", n, [fetch], plan, server_pid=pid,
                      note="fresh ES256 JWT per call; attestation, policy, durable audit on; "
                           "lean HTTP/2 client")
        for n in plan.badged:
            _load_row(rows, "badged-sign", "badged Sign", n, [sign], plan, server_pid=pid,
                      note="lean HTTP/2 client")
        try:
            import badgeclient  # noqa: F401
        except ImportError as exc:
            _unavailable(rows, "badgeclient-fetch", "badged via badgeclient",
                         f"badgeclient not importable: {exc}")
        else:
            for kind, label in (("fetch", "FetchToken"), ("sign", "Sign")):
                spec = OpSpec(f"badgeclient-{kind}", fparams if kind == "fetch" else
                              {"socket": sock})
                for n in plan.badgeclient:
                    _load_row(rows, f"badgeclient-{kind}", f"badged {label} via badgeclient", n,
                              [spec], plan, server_pid=pid,
                              note="the Python client library (grpcio)")
        if external is None and (daemon.proc is None or daemon.proc.poll() is not None):
            raise Unavailable("daemon died during the run")
        before = procfs.tree_rss_kib(pid) if pid else 0
        per = max(1, plan.rss_requests // plan.rss_clients)
        _say(f"badged RSS soak: {per * plan.rss_clients:,} requests "
             f"(FetchToken and Sign), {plan.rss_clients} clients; RSS before {before} KiB")
        soak = run_load([fetch, sign], plan.rss_clients, duration_s=0, warmup_s=0.2,
                        count_per_client=per, server_pid=pid)
        after = procfs.tree_rss_kib(pid) if pid else 0
        rep.badged.update(
            rss_before_kib=before, rss_after_kib=after, rss_requests=soak.ops,
            rss_growth_pct=round((after - before) * 100 / before, 2) if before else None,
            soak_ops_per_s=round(soak.ops_per_s, 1), soak_p99_us=round(soak.p99_us, 1),
            soak_error=soak.error)
        _say(f"  -> RSS after {after} KiB ({rep.badged['rss_growth_pct']}%), "
             f"{soak.ops_per_s:,.0f} ops/s" + (f", error: {soak.error}" if soak.error else ""))
        if paired is not None:
            paired(fetch, sign, pid)
    except (Unavailable, OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
        rep.badged["unavailable"] = reason
        _unavailable(rows, "badged-fetch", "badged", reason)
    finally:
        daemon.stop()


def _paired(rep: Report, plan: Plan, token: provision.Token, public: str, fetch: OpSpec,
            sign: OpSpec, badged_pid: int | None, src: Path) -> None:
    """ssh-agent restarted beside the running badged; the target runs alternate.

    Then, with the same ssh-agent, the ceiling rounds (``badgebench.ceiling``).
    """
    agent = SshAgent(token, name="ssh-agent-paired")
    try:
        agent.start()
        want = ecdsa_blob(public)
        ssh = OpSpec("ssh-agent", {"socket": str(agent.socket), "blob": want.hex(),
                                   "public_der": public})
        common: dict[str, Any] = dict(
            duration_s=plan.pair_duration_s, warmup_s=plan.warmup_s, slice_s=plan.slice_s,
            ssh=ssh, ssh_pid=agent.pid, fetch=fetch, sign=sign, badged_pid=badged_pid, say=_say)
        if plan.pair_rounds:
            _say(f"paired rounds: ssh-agent and badged alternating, {plan.pair_rounds} rounds "
                 f"of {plan.pair_duration_s:g}s runs")
            rep.paired = _guarded("paired rounds", lambda: run_paired(
                rounds=plan.pair_rounds, **common))
        if plan.ceiling_rounds:
            n = 16 if 16 in plan.badged else max(2, *plan.badged)
            _say(f"ceiling rounds: ssh-agent, one badged, two independent badged daemons "
                 f"({n // 2} + {n - n // 2} clients), {plan.ceiling_rounds} rounds of "
                 f"{plan.pair_duration_s:g}s")
            rep.ceiling = _guarded("ceiling rounds", lambda: run_ceiling(
                rounds=plan.ceiling_rounds, src=src, clients=n, **common))
        if plan.durability_rounds:
            _say(f"durability rounds: ssh-agent, badged (fsync) and a second badged "
                 f"--audit-durability write, {plan.durability_rounds} rounds of "
                 f"{plan.pair_duration_s:g}s")
            rep.durability = _guarded("durability rounds", lambda: durability.run_durability(
                rounds=plan.durability_rounds, src=src, **common))
    except (Unavailable, OSError, subprocess.TimeoutExpired) as exc:
        rep.paired = {"error": f"ssh-agent: {exc}"[:500]}
        _say(f"paired ssh-agent failed to start: {exc}")
    finally:
        agent.stop()


def _guarded(what: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one block of rounds; a failure is recorded in its JSON, never fatal."""
    try:
        return run()
    except (Unavailable, OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        _say(f"{what} failed: {exc}")
        return {"error": str(exc)[:500]}


def _targets(rep: Report) -> list[dict[str, Any]]:
    """The issue's targets, evaluated for information only (never an exit status)."""
    def rate(group: str, clients: int) -> Row | None:
        return next((r for r in rep.rows if r.group == group and r.clients == clients
                     and r.rate), None)

    out: list[dict[str, Any]] = []
    ssh16, ssh1 = rate("ssh-agent", 16), rate("ssh-agent", 1)
    f16, s16, f1 = rate("badged-fetch", 16), rate("badged-sign", 16), rate("badged-fetch", 1)

    def add(name: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"target": name, "value": None if value is None else round(value, 2),
                    "goal": goal, "met": met})

    if ssh16 and ssh16.rate:
        v = f16.rate / ssh16.rate if f16 and f16.rate else None
        add("FetchToken@16 / ssh-agent@16 throughput", v, ">= 1.5", None if v is None else v >= 1.5)
        v = s16.rate / ssh16.rate if s16 and s16.rate else None
        add("Sign@16 / ssh-agent@16 throughput", v, ">= 2.0", None if v is None else v >= 2.0)
    if ssh1 and ssh1.result and f1 and f1.result:
        v = f1.result.p50_us / ssh1.result.p50_us
        add("FetchToken@1 p50 / ssh-agent@1 p50", v, "<= 1.5", v <= 1.5)
    for row in (f16, s16):
        if row and row.result:
            add(f"{row.label}@16 p99 (ms)", row.result.p99_us / 1000, "< 10", row.result.p99_us < 1e4)
    med = rep.paired.get("median")
    if med:  # the alternating runs: more robust on a noisy machine
        n = len(rep.paired["rounds"])
        checks: tuple[tuple[str, str, str, Callable[[float], bool]], ...] = (
                ("fetch16_vs_ssh16", "FetchToken@16 / ssh-agent@16 throughput", ">= 1.5",
                 lambda v: v >= 1.5),
                ("sign16_vs_ssh16", "Sign@16 / ssh-agent@16 throughput", ">= 2.0",
                 lambda v: v >= 2.0),
                ("fetch1_p50_vs_ssh1_p50", "FetchToken@1 p50 / ssh-agent@1 p50", "<= 1.5",
                 lambda v: v <= 1.5),
                ("fetch16_p99_ms", "badged FetchToken@16 p99 (ms)", "< 10", lambda v: v < 10),
                ("sign16_p99_ms", "badged Sign@16 p99 (ms)", "< 10", lambda v: v < 10))
        for key, name, goal, ok in checks:
            v = med.get(key)
            add(f"{name} [paired, median of {n}]", v, goal, None if v is None else ok(v))
    g = rep.badged.get("rss_growth_pct")
    if g is not None:
        add(f"RSS growth over {rep.badged.get('rss_requests')} requests (%)", g, "< 5", g < 5)
    out.extend(_targets_22(rep))
    out.extend(ssh.targets(rep.rows, rep.ssh))
    return out


def _targets_22(rep: Report) -> list[dict[str, Any]]:
    """Issue 22's targets, from the paired, durability and scale blocks (information only)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, ok: Callable[[float], bool]) -> None:
        out.append({"target": f"#22 {name}", "value": None if value is None else round(value, 2),
                    "goal": goal, "met": None if value is None else ok(value)})

    med, dm = rep.paired.get("median"), rep.durability.get("median")
    if med:
        add("FetchToken@16 / ssh-agent@16 [paired]", med.get("fetch16_vs_ssh16"), ">= 2.0",
            lambda v: v >= 2.0)
        add("Sign@16 / ssh-agent@16 [paired]", med.get("sign16_vs_ssh16"), ">= 2.5",
            lambda v: v >= 2.5)
    if dm:
        add("sequential FetchToken p50 / ssh-agent p50, fsync mode [durability rounds]",
            dm.get("fetch1_p50_vs_ssh1_fsync"), "<= 1.5", lambda v: v <= 1.5)
        add("sequential FetchToken p50 / ssh-agent p50, write mode [durability rounds]",
            dm.get("fetch1_p50_vs_ssh1_write"), "<= 1.0", lambda v: v <= 1.0)
    for t in rep.scale.get("targets", []):
        add(t["target"], t["value"], t["goal"], lambda v, t=t: bool(t["met"]))
    return out


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM into an exception so the finally blocks stop servers and wipe state."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small counts for CI (< 2 min)")
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"comma-separated subset of: {','.join(GROUPS)}")
    ap.add_argument("--duration", type=float, help="seconds of measured load per row")
    ap.add_argument("--rss-requests", type=int, help="requests in the badged RSS soak")
    ap.add_argument("--pair-rounds", type=int,
                    help="alternating ssh-agent/badged rounds for the targets (full: 5, quick: 0)")
    ap.add_argument("--ceiling-rounds", type=int,
                    help="rounds of one badged vs two independent daemons vs ssh-agent, the "
                         "upper bound of a multi-process daemon (full: 3, quick: 0)")
    ap.add_argument("--durability-rounds", type=int,
                    help="rounds of ssh-agent vs badged in both audit durability modes "
                         "(fsync, write) (full: 3, quick: 0)")
    ap.add_argument("--clients", help="override every concurrency list, e.g. 1,16")
    ap.add_argument("--badged-src", type=Path, default=REPO,
                    help="tree with daemon/ and clients/ to run badged from (default: this repo)")
    ap.add_argument("--badged-socket", type=Path,
                    help="measure an already running badged at this workload socket instead "
                         "of starting one (its policy must grant the caller audience "
                         f"{AUDIENCE} scope read, and sign)")
    ap.add_argument("--badged-pid", type=int,
                    help="with --badged-socket: the daemon's pid, for server CPU and RSS")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--json", type=Path, help="write the JSON here instead of --out-dir")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--keep-state", action="store_true",
                    help="keep the temp state dir (token, PIN, logs) for debugging")
    ap.add_argument("--hostile", action="store_true",
                    help="issue 16's targets under hostile local users (root; --duration, "
                         "default 60 s; --clients, default 16)")
    ap.add_argument("--scale", action="store_true",
                    help="issue 22's scale run instead of the comparison: 1 -> 1,000 agents, "
                         "10 -> 10,000 policy rules, 1 -> 1,000 held connections, start-up, "
                         "audit verify of 1M records (--quick: smaller)")
    ap.add_argument("--ab", type=Path, metavar="OTHER_TREE",
                    help="paired A/B of this tree (or --badged-src) against OTHER_TREE: "
                         "FetchToken@1 p50, FetchToken@16, Sign@16, ABBA rounds "
                         "(--pair-rounds, default 8; --duration, default 4 s)")
    ap.add_argument("--scale-agents", type=int,
                    help="with --scale: agents to create (default 1,000; --quick 100)")
    ap.add_argument("--scale-only", choices=("startup", "verify"),
                    help="with --scale: only this part; startup: start-up to ready with "
                         "--scale-agents agents, then with 10,000 rules too, timed "
                         "--pair-rounds times (default 3); verify: audit verify of the "
                         "generated log, cold (--pair-rounds times with --scale-state)")
    ap.add_argument("--scale-state", type=Path,
                    help="with --scale-only startup: build the agents in this dir once and "
                         "reuse it on later runs (kept); verify: the same for the log")
    ap.add_argument("--scale-jobs", type=int,
                    help="with --scale-only verify: processes (default: audit verify's own)")
    args = ap.parse_args(argv)
    if args.hostile:
        return _hostile(args)
    if args.scale:
        return _scale(args)
    if args.ab:
        return _ab(args)

    plan = QUICK if args.quick else FULL
    over: dict[str, Any] = {}
    if args.duration:
        over["duration_s"] = args.duration
        over["slice_s"] = min(plan.slice_s, args.duration)
        over["warmup_s"] = min(plan.warmup_s, max(0.1, args.duration / 2))
    if args.pair_rounds is not None:
        over["pair_rounds"] = args.pair_rounds
    if args.ceiling_rounds is not None:
        over["ceiling_rounds"] = args.ceiling_rounds
    if args.durability_rounds is not None:
        over["durability_rounds"] = args.durability_rounds
    if args.duration and (args.pair_rounds is not None or args.ceiling_rounds is not None
                          or args.durability_rounds is not None):
        over["pair_duration_s"] = args.duration
    if args.rss_requests is not None:
        over["rss_requests"] = args.rss_requests
    if args.clients:
        cl = tuple(int(x) for x in args.clients.split(","))
        over.update(inprocess=tuple(c for c in cl if c <= 2) or (1,), ssh_agent=cl, p11kit=cl,
                    badged=cl, badgeclient=cl)
    if over:
        plan = Plan(**{**plan.__dict__, **over})
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = groups - set(GROUPS)
    if unknown:
        ap.error(f"unknown group(s) {sorted(unknown)}; choose from {GROUPS}")

    src = args.badged_src.resolve()
    for sub in ("clients", "daemon"):  # spawned workers inherit sys.path
        sys.path.insert(0, str(src / sub))
    module = provision.find_first(provision.MODULE_GLOBS)
    if module is None or shutil.which("softhsm2-util") is None:
        print("SoftHSM2 is missing: apt-get install -y softhsm2", file=sys.stderr)
        return 2

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    rep = Report(meta={
        "timestamp": stamp, "mode": plan.mode, "plan": plan.__dict__, "cpus": os.cpu_count(),
        "host": platform.node(), "loadavg_before": procfs.loadavg(), "versions": _versions(src),
        "softhsm_module": module, "badged_src": str(src),
    })
    t_start = time.monotonic()
    state = provision.make_state_dir()
    with _terminate_cleanly():
        try:
            _say(f"state dir {state} (removed at the end); mode {plan.mode}")
            rep.meta["host"] = host.describe(REPO, state)
            for line in host.header_lines(rep.meta["host"], rep.meta["versions"]):
                _say(line)
            token = provision.provision_token(state, module)
            os.environ.update(token.env)
            cold: float | None = None
            key = provision.FALLBACK_KEY
            if "badged" in groups and args.badged_socket is None:
                # First start creates the demo agent's keys in *this* token; the
                # peers then sign with the agent's Sign key: literally the same key.
                first = Badged(state, src)
                try:
                    cold = first.start()
                    key = f"badged/agent/{BADGED_AGENT}/v1/sig"
                except Unavailable as exc:
                    rep.badged["first_start_error"] = str(exc)
                    _say(f"badged first start failed: {exc}")
                finally:
                    first.stop()
            public = provision.key_public_der(token, key, create=key == provision.FALLBACK_KEY)
            if public is None:
                key = provision.FALLBACK_KEY
                public = provision.key_public_der(token, key, create=True)
            assert public is not None
            rep.meta["key"] = {"label": key, "token": token.label, "algorithm": "EC P-256",
                               "spki_sha256_prefix": _fingerprint(public)}
            _say(f"key {key} in token {token.label}")
            bench_peers(rep.rows, plan, token, key, public, groups)
            if "badged" in groups:
                pair = None
                if ((plan.pair_rounds or plan.ceiling_rounds or plan.durability_rounds)
                        and "ssh-agent" in groups):
                    def pair(fetch: OpSpec, sign: OpSpec, pid: int | None) -> None:
                        _paired(rep, plan, token, public, fetch, sign, pid, src)
                bench_badged(rep, plan, state, cold, src, args.badged_socket, args.badged_pid,
                             pair)
            if "proxy" in groups:  # issue 20's rows (badgebench.proxy), in rep.badged["proxy"]
                from badgebench.proxy import run_proxy

                rep.badged["proxy"] = _guarded("proxy rows", lambda: run_proxy(
                    src=src, duration_s=plan.duration_s, warmup_s=plan.warmup_s, say=_say))
                for t in rep.badged["proxy"].get("targets", []):
                    _say(f"proxy: {t['target']}: {t['value']} (goal {t['goal']})")
            if "ssh" in groups:  # issue 19: the SSH agent socket vs ssh-agent, same key
                rep.ssh = ssh.bench_ssh(rep.rows, plan, token, state, src, _load_row, _say)
            if "kit" in groups:  # issue 18's rows (badgebench.kit), in rep.badged["kit"]
                from badgebench.kit import run_kit

                rep.badged["kit"] = _guarded("kit rows", lambda: run_kit(
                    src=src, token=token, public=public, quick=plan.mode == "quick", say=_say))
                for t in rep.badged["kit"].get("targets", []):
                    _say(f"kit: {t['name']}: {t['value']} (goal {t['goal']})")
        except KeyboardInterrupt:
            _say("interrupted; cleaning up")
            return 130
        finally:
            if args.keep_state:
                _say(f"kept state dir {state}")
            else:
                provision.cleanup(state)

    report.compute_ratios(rep.rows)
    rep.meta["loadavg_after"] = procfs.loadavg()
    rep.meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    if plan.mode == "full":
        rep.targets = _targets(rep) + list(rep.badged.get("proxy", {}).get("targets", []))
    out_json = args.json or args.out_dir / f"{stamp}.json"
    report.write_json(rep, out_json)
    print()
    print(f"badged benchmark — {plan.mode} mode, {rep.meta['cpus']} CPUs, "
          f"key {rep.meta['key']['label']} in SoftHSM token {provision.TOKEN_LABEL}")
    print(f"load average before {rep.meta['loadavg_before']}, "
          f"after {rep.meta['loadavg_after']}; {rep.meta['elapsed_s']}s total")
    if rep.meta.get("host"):
        for line in host.header_lines(rep.meta["host"], rep.meta["versions"],
                                      rep.meta["loadavg_after"]):
            print(line)
    print()
    print(report.format_table(rep.rows))
    b = rep.badged
    if b.get("external_socket"):
        print(f"\nbadged: external daemon at {b['external_socket']} (pid {b.get('external_pid')});"
              f" start-up not measured")
    if b and "unavailable" not in b and not b.get("external_socket") and b.get("start_warm_s"):
        cold = b.get("start_cold_s")
        print(f"\nbadged start-up to ready: {b.get('start_warm_s')}s" + (
            f" (first start, creating the agent's keys: {cold}s)" if cold else
            f" (first start failed: {report.short_error(str(b.get('first_start_error')))})"))
    if b and "unavailable" not in b and b.get("rss_before_kib"):
        print(f"badged RSS: {b.get('rss_at_ready_kib')} KiB at ready, "
              f"{b.get('rss_before_kib')} KiB before and {b.get('rss_after_kib')} KiB after "
              f"{b.get('rss_requests'):,} requests ({b.get('rss_growth_pct')}%)")
    noisy = report.noisy_rows(rep.rows)
    if noisy or rep.meta["loadavg_before"][0] > (rep.meta["cpus"] or 1) / 2:
        print(f"\nNOISY RUN: load average was {rep.meta['loadavg_before']} at the start; "
              f"{len(noisy)} row(s) saw > 0.25 cores of other work ("
              + ", ".join(f"{r.label}@{r.clients}" for r in noisy[:6])
              + "). Compare ratios, or rerun on a quiet machine.")
    if rep.paired.get("rounds"):
        print(f"\npaired rounds (ssh-agent and badged alternating, "
              f"{rep.paired['duration_s']:g}s per run):")
        for i, rnd in enumerate(rep.paired["rounds"], 1):
            print(f"  round {i}: " + ", ".join(
                f"{k} {v['ops_per_s']:,.0f}/s p50 {v['p50_us']:,.0f} p99 {v['p99_us']:,.0f} µs"
                for k, v in rnd["runs"].items()))
    elif rep.paired.get("error"):
        print(f"\npaired rounds: not available ({report.short_error(rep.paired['error'])})")
    for line in _ceiling_lines(rep.ceiling):
        print(line)
    for line in durability.lines(rep.durability):
        print(line)
    for line in kit.lines(rep.badged.get("kit", {})):
        print(line)
    for line in ssh.lines(rep.ssh):
        print(line)
    if rep.targets:
        print("\ntargets of issue #7 (unmarked) and issue #22 (marked #22); information, "
              "not a pass/fail of this command:")
        for t in rep.targets:
            mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
            print(f"  {t['target']}: {t['value']} (goal {t['goal']}) — {mark}")
    out_md = out_json.with_suffix(".md")
    out_md.write_text(_markdown(rep))
    print(f"\nJSON: {out_json}\nMarkdown table: {out_md}")
    if not args.no_plot:
        png = out_json.with_suffix(".png")
        why = report.plot(rep, png)
        print(f"plot: {png}" if why is None else f"plot: not written ({why})")
    return 0


def _hostile(args: argparse.Namespace) -> int:
    """``--hostile``: the attack run and its target table (badgebench.hostile)."""
    import json

    from badgebench.hostile import print_table, run_hostile

    src = args.badged_src.resolve()
    for sub in ("clients", "daemon"):
        sys.path.insert(0, str(src / sub))
    duration = args.duration or 60.0
    clients = int(args.clients.split(",")[-1]) if args.clients else 16
    result = run_hostile(src, duration=duration, settle=min(30.0, max(5.0, duration / 2)),
                         legit_clients=clients)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if all(t[3] is not False for t in result["targets"]) else 1


def _ab(args: argparse.Namespace) -> int:
    """``--ab OTHER_TREE``: two trees' daemons measured alternately (badgebench.abtrees)."""
    import json

    from badgebench.abtrees import run_ab

    src = args.badged_src.resolve()
    for sub in ("clients", "daemon"):
        sys.path.insert(0, str(src / sub))
    module = provision.find_first(provision.MODULE_GLOBS)
    if module is None:
        print("SoftHSM2 is missing: apt-get install -y softhsm2", file=sys.stderr)
        return 2
    duration = args.duration or 4.0
    with _terminate_cleanly():
        result = run_ab(a_src=src, b_src=args.ab.resolve(), module=module, audience=AUDIENCE,
                        rounds=args.pair_rounds or 8, duration_s=duration,
                        warmup_s=min(1.0, duration / 2), slice_s=min(1.0, duration), say=_say)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


def _scale(args: argparse.Namespace) -> int:
    """``--scale``: the growth run and its rows (badgebench.scale)."""
    from badgebench import scale

    src = args.badged_src.resolve()
    for sub in ("clients", "daemon"):
        sys.path.insert(0, str(src / sub))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    rep = Report(meta={"timestamp": stamp, "mode": "scale" + ("-quick" if args.quick else ""),
                       "cpus": os.cpu_count(), "host": None, "loadavg_before": procfs.loadavg(),
                       "versions": _versions(src), "badged_src": str(src)})
    probe = provision.make_state_dir()
    try:
        rep.meta["host"] = host.describe(REPO, probe)
    finally:
        provision.cleanup(probe)
    for line in host.header_lines(rep.meta["host"], rep.meta["versions"]):
        _say(line)
    t0 = time.monotonic()
    with _terminate_cleanly():
        try:
            if args.scale_only == "startup":
                rep.scale = scale.run_startup(
                    src, _say, state=args.scale_state, agents=args.scale_agents or 1000,
                    repeats=args.pair_rounds or 3, keep=args.keep_state)
            elif args.scale_only == "verify":
                rep.scale = scale.run_verify(_say, quick=args.quick, keep=args.scale_state,
                                             repeats=args.pair_rounds or 1, jobs=args.scale_jobs)
            else:
                rep.scale = scale.run_scale(src, _say, quick=args.quick, duration=args.duration,
                                            max_agents=args.scale_agents)
        except KeyboardInterrupt:
            _say("interrupted")
            return 130
        except (Unavailable, OSError, RuntimeError, subprocess.SubprocessError) as exc:
            rep.scale = {"error": str(exc)[:500]}
    rep.meta["loadavg_after"] = procfs.loadavg()
    rep.meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    out_json = args.json or args.out_dir / f"{stamp}-scale.json"
    report.write_json(rep, out_json)
    print(f"\nbadged scale run — {rep.meta['mode']}, {rep.meta['elapsed_s']}s")
    text = host.header_lines(rep.meta["host"], rep.meta["versions"], rep.meta["loadavg_after"])
    text += (scale.verify_lines(rep.scale) if args.scale_only == "verify"
             else scale.startup_lines(rep.scale) if args.scale_only else scale.lines(rep.scale))
    print("\n".join(text))
    out_md = out_json.with_suffix(".md")
    out_md.write_text("```\n" + "\n".join(text) + "\n```\n")
    print(f"\nJSON: {out_json}\nMarkdown: {out_md}")
    return 0


def _markdown(rep: Report) -> str:
    """The same results as a Markdown section, to paste into docs/performance.md."""
    m, b = rep.meta, rep.badged
    v = m.get("versions", {})
    lines = [f"Run {m['timestamp']} ({m['mode']} mode), {m['cpus']} CPUs, kernel "
             f"{v.get('kernel')}, badged {v.get('badged_commit')}, {v.get('openssl')}, "
             f"{v.get('openssh')}, SoftHSM {v.get('softhsm')}, grpcio {v.get('grpcio')}; "
             f"load average {m['loadavg_before']} before, {m.get('loadavg_after')} after; "
             f"key `{m['key']['label']}`.", ""]
    if m.get("host"):
        lines += ["```", *host.header_lines(m["host"], v, m.get("loadavg_after")), "```", ""]
    lines += [report.format_markdown(rep.rows), ""]
    lines += kit.lines(rep.badged.get("kit", {}))
    if b and "unavailable" not in b and not b.get("external_socket") and b.get("rss_before_kib"):
        lines.append(f"- badged start-up to ready: {b.get('start_warm_s')} s (first start, "
                     f"creating the agent's keys: {b.get('start_cold_s')} s)")
        lines.append(f"- badged RSS: {b.get('rss_at_ready_kib')} KiB at ready; "
                     f"{b.get('rss_before_kib')} KiB before and {b.get('rss_after_kib')} KiB "
                     f"after {b.get('rss_requests'):,} requests ({b.get('rss_growth_pct')} %), "
                     f"{b.get('soak_ops_per_s')} ops/s during the soak")
    if rep.paired.get("rounds"):
        rounds = rep.paired["rounds"]
        lines.append(f"- paired rounds ({len(rounds)} rounds, {rep.paired['duration_s']:g} s per run, "
                     "ABBA): " + "; ".join(
                         f"{k} " + " / ".join(f"{r['ratios'][k]:.2f}" for r in rounds)
                         for k in rounds[0]["ratios"]))
    lines.extend(f"- {line.strip()}" for line in _ceiling_lines(rep.ceiling)[1:3])
    lines.extend(f"- {line.strip()}" for line in durability.lines(rep.durability)[1:])
    lines.extend(f"- {line.strip()}" for line in ssh.lines(rep.ssh)[1:])
    for t in rep.targets:
        mark = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
        lines.append(f"- target: {t['target']}: {t['value']} (goal {t['goal']}): {mark}")
    return "\n".join(lines) + "\n"


def _ceiling_lines(ceiling: dict[str, Any]) -> list[str]:
    """The ceiling rounds as text: a heading, the medians, then each round."""
    if ceiling.get("error"):
        return ["", f"ceiling rounds: not available ({report.short_error(ceiling['error'])})"]
    if not ceiling.get("rounds"):
        return []
    med, rounds = ceiling["median"], ceiling["rounds"]

    def f(key: str) -> str:
        v = med.get(key)
        return "n/a" if v is None else f"{v:.2f}x"

    n = ceiling["clients"]
    out = ["", f"ceiling (upper bound of a multi-process badged: two independent daemons, "
               f"own tokens and audit logs, {n} clients split evenly; median of "
               f"{len(rounds)} ABBA rounds, {ceiling['duration_s']:g}s per run):",
           f"  ceiling medians vs ssh-agent@{n}: FetchToken one daemon {f('fetch_one_vs_ssh')}, "
           f"two daemons {f('fetch_two_vs_ssh')} (goal 1.5x); Sign one {f('sign_one_vs_ssh')}, "
           f"two {f('sign_two_vs_ssh')} (goal 2.0x); two/one: FetchToken "
           f"{f('fetch_two_vs_one')}, Sign {f('sign_two_vs_one')}"]
    for i, rnd in enumerate(rounds, 1):
        out.append(f"  round {i}: " + ", ".join(
            f"{k} {v['ops_per_s']:,.0f}/s ({v['server_cpu_us_per_op'] or 0:,.0f} µs server CPU/op,"
            f" machine {v['machine_busy_cores'] or 0:.2f} cores busy)"
            for k, v in rnd["runs"].items()))
    return out


def _fingerprint(public_der_hex: str) -> str:
    import hashlib

    return hashlib.sha256(bytes.fromhex(public_der_hex)).hexdigest()[:16]


if __name__ == "__main__":
    sys.exit(main())
