"""``bench/run --scale``: how cost grows with the work (issue 22 item 3).

One ``badged dev`` on a throwaway token, then, step by step, sequential
FetchToken latency (one lean client, the request a user expects to cost the
same whatever else the daemon holds) and the daemon's RSS with:

* policy rules 1 -> 10 -> 100 -> 1,000 -> 10,000 (rules that do not apply to
  the caller: half for other uids, half for the caller's uid with another
  binary's hash; reloaded with ``ReloadPolicy``, whose time is recorded);
* agent identities 1 -> 10 -> 100 -> 1,000 (``CreateAgent`` over the admin
  socket: two keys each in the token; creation rate recorded);
* both at once (1,000 agents, 10,000 rules), then start-up to ready with them;
* held connections 1 -> 10 -> 100 -> 1,000 (each made one GetJwks call, then
  stays idle; as root they come from uids the scaled policy names, 250 per
  uid, under the per-uid cap; otherwise from this uid, at most 200);
* ``audit verify`` of a generated log (1,000,000 records; 100,000 with
  ``--quick``) in a subprocess, its pages evicted first (so it reads the
  disk), against the disk's sequential read rate for the same files
  (O_DIRECT) -- plus its peak RSS.

The daemon runs with ``--audit-durability write`` so the sync latency of a
shared disk (milliseconds on a loaded host) does not drown the differences
being measured; the fsync cost per call does not depend on agents or rules,
and the header's sync line and the durability rounds report it. Every
latency is the median of the step's calls (p99 too), with the baseline
measured again at the end to show the run's drift.
"""

from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from badgebench import procfs, provision
from badgebench.load import run_load
from badgebench.ops import OpSpec
from badgebench.servers import Badged, Unavailable

Say = Callable[[str], None]
AUDIENCE = "https://api.example.com"
JWKS_PATH = "/badged.v1.WorkloadService/GetJwks"
HOLD_PER_UID = 250
HOLD_UID_BASE = 200_000  # the scaled policy names uids HOLD_UID_BASE + i


def _extra_rules(n: int, uid: int) -> str:
    """``n`` agent rules that never apply to the benchmark's caller."""
    out = []
    for i in range(n):
        if i % 2 == 0:
            sels = f'"unix:uid:{HOLD_UID_BASE + i // 2}"'
        else:  # the caller's own uid, but another binary
            sels = f'"unix:uid:{uid}", "unix:sha256:{i:064x}"'
        out.append(f'[[agent]]\nname = "scale-rule-{i}"\nselectors = [{sels}]\n'
                   'bundles = ["demo"]\n')
    return "\n".join(out)


class _Step:
    def __init__(self, daemon: Badged, fetch: OpSpec, duration: float, say: Say) -> None:
        self.daemon, self.fetch, self.duration, self.say = daemon, fetch, duration, say
        self.rows: list[dict[str, Any]] = []

    def measure(self, what: str, n: int, **extra: Any) -> dict[str, Any]:
        pid = self.daemon.pid
        res = run_load([self.fetch], 1, duration_s=self.duration, slice_s=min(1.0, self.duration),
                       warmup_s=0.5, server_pid=pid)
        row = {"what": what, "n": n, "p50_us": round(res.p50_us, 1),
               "p99_us": round(res.p99_us, 1), "ops_per_s": round(res.ops_per_s, 1),
               "server_cpu_us_per_op": _r(res.server_cpu_us_per_op),
               "rss_kib": procfs.tree_rss_kib(pid) if pid else None,
               "loadavg": procfs.loadavg(), "error": res.error, **extra}
        self.say(f"scale {what}={n}: FetchToken p50 {res.p50_us:,.0f} µs p99 "
                 f"{res.p99_us:,.0f} µs, RSS {row['rss_kib']} KiB"
                 + (f", error {res.error}" if res.error else ""))
        self.rows.append(row)
        return row


def _admin(daemon: Badged) -> Any:
    from badgeclient import AdminClient

    return AdminClient(str(daemon.state_dir / "run" / "admin.sock"), timeout=120.0)


def _reload(daemon: Badged, policy: Path, text: str) -> float:
    policy.write_text(text)
    t0 = time.monotonic()
    with _admin(daemon) as admin:
        ok, error = admin.reload_policy()
    if not ok:
        raise Unavailable(f"policy reload refused: {error[:200]}")
    return time.monotonic() - t0


def run_scale(src: Path, say: Say, *, quick: bool = False, duration: float | None = None,
              max_agents: int | None = None) -> dict[str, Any]:
    rules_steps = (10, 100, 1000) if quick else (10, 100, 1000, 10_000)
    top = max_agents or (100 if quick else 1000)
    agent_steps = (*(n for n in (10, 100, 300, 1000) if n < top), top)
    held_steps = (1, 10, 100) if quick else (1, 10, 100, 1000)
    records = 100_000 if quick else 1_000_000
    dur = duration or (1.0 if quick else 3.0)
    module = provision.find_first(provision.MODULE_GLOBS)
    if module is None:
        raise Unavailable("SoftHSM2 is missing")
    state = provision.make_state_dir()
    out: dict[str, Any] = {"durability": "write", "duration_s": dur, "quick": quick}
    daemon = Badged(state, src, ("--audit-durability", "write"))
    try:
        token = provision.provision_token(state, module)
        os.environ.update(token.env)
        out["start_first_s"] = round(daemon.start(), 3)
        daemon.stop()
        out["start_1_agent_s"] = round(daemon.start(), 3)
        say(f"scale: badged ready in {out['start_1_agent_s']}s with 1 agent ({state})")
        fetch = OpSpec("badged-fetch", {"socket": str(daemon.socket), "audience": AUDIENCE,
                                        "scopes": "read", "ttl": "60"})
        step = _Step(daemon, fetch, dur, say)
        step.measure("baseline", 1)
        policy = state / "policy.toml"
        base = policy.read_text()
        uid = os.getuid()
        reloads: dict[int, float] = {}
        for n in rules_steps:
            reloads[n] = round(_reload(daemon, policy, base + "\n" + _extra_rules(n - 1, uid)), 3)
            step.measure("rules", n, reload_s=reloads[n])
        _reload(daemon, policy, base)
        created = 1
        create_s = 0.0
        with _admin(daemon) as admin:
            for n in agent_steps:
                t0 = time.monotonic()
                while created < n:
                    admin.create_agent(f"scale-{created:04d}")
                    created += 1
                create_s += time.monotonic() - t0
                step.measure("agents", n)
        out["agents_created_per_s"] = round((created - 1) / create_s, 1) if create_s else None
        daemon.stop()  # the start-up target: agents only, the 1-rule policy
        out["start_agents_s"] = round(daemon.start(), 3)
        say(f"scale: start-up with {created} agents: {out['start_agents_s']}s")
        both = rules_steps[-1]
        _reload(daemon, policy, base + "\n" + _extra_rules(both - 1, uid))
        step.measure("agents+rules", created, rules=both)
        daemon.stop()
        out["start_many_s"] = round(daemon.start(), 3)
        out["start_many"] = {"agents": created, "rules": both}
        say(f"scale: start-up with {created} agents and {both} rules: {out['start_many_s']}s")
        step.measure("after restart", created, rules=both)
        out["held"] = _held(daemon, step, held_steps, say)
        _reload(daemon, policy, base)
        step.measure("baseline again", 1, agents=created)
        out["steps"] = step.rows
        out["policy_reload_s"] = reloads
    finally:
        daemon.stop()
        provision.cleanup(state)
    out["audit_verify"] = _guard(lambda: audit_verify(records, say))
    out["targets"] = _targets(out)
    return out


# -- start-up alone, on a state built once (issue 22: "1,000 agents under 2 s") ---------

_BUILT = "scale-agents.json"  # in the state dir: how many agents it holds, once built


def run_startup(src: Path, say: Say, *, state: Path | None = None, agents: int = 1000,
                rules: int = 10_000, repeats: int = 3, keep: bool = False) -> dict[str, Any]:
    """Start-up to ready with ``agents`` agents (1-rule policy), then with ``rules`` too.

    Creating 1,000 agents takes minutes; this builds that state once (its
    creation rate recorded per hundred, so a rate that falls with every
    agent shows) in ``state`` and, given the same directory again, reuses it:
    only the starts are timed. Each start's load average is recorded with it
    (a shared host's load moves start-up by tens of percent).
    """
    module = provision.find_first(provision.MODULE_GLOBS)
    if module is None:
        raise Unavailable("SoftHSM2 is missing")
    made = state is None
    if state is None:
        state = provision.make_state_dir()
    out: dict[str, Any] = {"state_dir": str(state), "durability": "write"}
    daemon = Badged(state, src, ("--audit-durability", "write"))
    marker = state / _BUILT
    try:
        if marker.exists():
            os.environ.update(provision.Token(
                state_dir=state, conf=state / "private" / "softhsm" / "softhsm2.conf",
                pin_file=state / "private" / "softhsm" / "user.pin", module=module).env)
            out["built"] = json.loads(marker.read_text())
            say(f"scale: reusing {state} ({out['built'].get('agents')} agents)")
        else:
            state.mkdir(mode=0o755, exist_ok=True)
            os.chmod(state, 0o755)
            os.environ.update(provision.provision_token(state, module).env)
            daemon.start()
            out["built"] = _create_agents(daemon, agents, say)
            daemon.stop()
            marker.write_text(json.dumps(out["built"]))
        policy = state / "policy.toml"
        base = policy.read_text()
        n = int(out["built"]["agents"])
        try:
            out["start_agents"] = _starts(daemon, repeats, say, f"{n} agents")
            policy.write_text(base + "\n" + _extra_rules(rules - 1, os.getuid()))
            out["start_many"] = _starts(daemon, repeats, say, f"{n} agents and {rules} rules")
        finally:
            policy.write_text(base)
        out["agents"], out["rules"] = n, rules
    finally:
        daemon.stop()
        if made and not keep:
            provision.cleanup(state)
    return out


def _create_agents(daemon: Badged, agents: int, say: Say) -> dict[str, Any]:
    """CreateAgent up to ``agents`` (the dev agent counts), timing each hundred."""
    per_100: list[float] = []
    t_all = time.monotonic()
    with _admin(daemon) as admin:
        have = len(admin.list_agents())
        created = have
        t0 = time.monotonic()
        while created < agents:
            admin.create_agent(f"scale-{created:04d}")
            created += 1
            if created % 100 == 0:
                per_100.append(round(100 / (time.monotonic() - t0), 2))
                t0 = time.monotonic()
                say(f"scale: {created} agents, the last hundred at {per_100[-1]}/s "
                    f"(load {procfs.loadavg()})")
    wall = time.monotonic() - t_all
    return {"agents": created, "created": created - have, "create_s": round(wall, 1),
            "per_s": round((created - have) / wall, 2) if wall else None,
            "per_s_by_hundred": per_100}


def _starts(daemon: Badged, repeats: int, say: Say, what: str) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        load = procfs.loadavg()
        s = round(daemon.start(), 3)
        daemon.stop()
        runs.append({"s": s, "loadavg": load})
        say(f"scale: start-up with {what}: {s}s (load {load})")
    times = sorted(r["s"] for r in runs)
    return {"runs": runs, "min_s": times[0], "median_s": times[len(times) // 2]}


def startup_lines(out: dict[str, Any]) -> list[str]:
    if out.get("error"):
        return ["", f"scale start-up: not available ({str(out['error'])[:200]})"]
    b = out.get("built", {})
    res = ["", f"scale start-up (state {out.get('state_dir')}):"]
    if b.get("per_s") is not None:
        res.append(f"  agents created: {b['created']} in {b['create_s']} s = {b['per_s']}/s; "
                   f"per hundred: {b.get('per_s_by_hundred')}")
    for key, what in (("start_agents", f"{out.get('agents')} agents"),
                      ("start_many", f"{out.get('agents')} agents + {out.get('rules')} rules")):
        r = out.get(key)
        if r:
            runs = ", ".join(f"{x['s']} s (load {x['loadavg'][0] if x['loadavg'] else '?'})"
                             for x in r["runs"])
            res.append(f"  start-up to ready with {what}: median {r['median_s']} s, "
                       f"min {r['min_s']} s [{runs}]")
    return res


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except (Unavailable, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)[:500]}


# -- held connections ------------------------------------------------------------


def _hold(sock: str, uid: int | None, n: int, conn: Connection) -> None:
    """In a spawned child: become ``uid``, open ``n`` connections, one call each, hold."""
    import resource

    from badgebench.h2grpc import H2GrpcChannel

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 64)), hard))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        chans = []
        for _ in range(n):
            ch = H2GrpcChannel(sock)
            ch.unary(JWKS_PATH, b"")
            chans.append(ch)
        conn.send(("ready", len(chans)))
        conn.recv()  # hold until told
        for ch in chans:
            ch.close()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _held(daemon: Badged, step: _Step, steps: tuple[int, ...], say: Say) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    as_root = os.geteuid() == 0
    holders: list[tuple[Any, Connection]] = []
    held = 0
    info: dict[str, Any] = {"from": f"uids {HOLD_UID_BASE}.. ({HOLD_PER_UID} per uid)"
                            if as_root else "this uid (not root: at most 200)"}
    try:
        for n in steps:
            if not as_root and n > 200:
                info["skipped"] = f"{n}: not root"
                break
            while held < n:
                k = min(n - held, HOLD_PER_UID if as_root else 200 - held)
                uid = HOLD_UID_BASE + len(holders) if as_root else None
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_hold, args=(str(daemon.socket), uid, k, child))
                p.start()
                child.close()
                if not parent.poll(120):
                    raise Unavailable("a connection holder did not get ready in 120 s")
                status, value = parent.recv()
                if status != "ready":
                    raise Unavailable(f"connection holder: {value}")
                holders.append((p, parent))
                held += int(value)
            step.measure("held connections", held)
    except (Unavailable, OSError, EOFError) as exc:
        info["error"] = str(exc)[:300]
        say(f"scale: held connections stopped: {exc}")
    finally:
        for p, parent in holders:
            try:
                parent.send("stop")
            except OSError:
                pass
            p.join(30)
            if p.is_alive():
                p.kill()
    info["max_held"] = held
    return info


# -- audit verify ----------------------------------------------------------------


_GEN = r"""
import asyncio, sys, time
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization
from badged.audit import AuditConfig, AuditLog
from badged.audit.log import unsafe_no_fsync

class Key:
    def __init__(self, k): self._k = k
    name = "scale"
    def public_key(self): return self._k.public_key()
    def sign(self, data, alg): return self._k.sign(data, alg)

async def main(d, n, pem):
    k = ec.generate_private_key(ec.SECP256R1())
    Path(pem).write_bytes(k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    log = AuditLog.open(AuditConfig(directory=Path(d), checkpoint_seconds=None),
                        signer=Key(k), fsync=unsafe_no_fsync)
    rec = {"event": "token.issued", "agent": "deploy-bot", "decision": "allow",
           "audience": "https://api.example.com", "scopes": ["read"],
           "ttl": 300, "credential_sha256": "ab" * 32,
           "caller": {"pid": 4242, "uid": 1000, "exe": "/usr/bin/python3.11"}}
    async def w(i0):
        for i in range(i0, n, 32):
            await log.append(dict(rec, jti=f"j{i:08d}"))
    await asyncio.gather(*[w(i) for i in range(32)])
    await log.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""

_VERIFY = r"""
import json, resource, sys, time
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from badged.audit import verify
from badged.audit import files
pub = serialization.load_pem_public_key(Path(sys.argv[2]).read_bytes())
jobs = int(sys.argv[3]) if len(sys.argv) > 3 else None
if jobs is None:
    jobs = sys.modules["badged.audit.verify"]._auto_jobs(files.list_files(Path(sys.argv[1])))
def cpu():
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                               resource.getrusage(resource.RUSAGE_CHILDREN)))
t0, c0 = time.monotonic(), cpu()
r = verify(sys.argv[1], pub, jobs=jobs)
s, c = time.monotonic() - t0, cpu() - c0  # user+sys of this process and its workers
print(json.dumps({"s": s, "cpu_s": c, "ok": r.ok, "records": r.records,
                  "files": r.files, "checkpoints": r.checkpoints, "processes": jobs}))
"""


def _py(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter (same sys.path); return its stdout."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          timeout=3600, check=False,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed: {proc.stderr.decode(errors='replace')[-300:]}")
    return proc.stdout.decode()


def _evict(paths: list[Path]) -> None:
    """Drop these files' clean pages, so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _direct_read_mb_s(paths: list[Path]) -> float | None:
    """Sequential read rate of the files from the disk (O_DIRECT, 4 MiB reads)."""
    size = 4 << 20
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    total = 0
    t0 = time.monotonic()
    try:
        for p in paths:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
            try:
                while (n := os.readv(fd, [buf])) > 0:
                    total += n
            finally:
                os.close(fd)
    except OSError:
        return None  # a filesystem without O_DIRECT
    wall = time.monotonic() - t0
    return total / wall / 1e6 if wall > 0 else None


def audit_verify(records: int, say: Say, *, keep: Path | None = None,
                 jobs: int | None = None) -> dict[str, Any]:
    """Verify a generated ``records``-record log cold; ``keep``: generate it there once."""
    import resource

    from badged.audit import files

    state = keep or provision.make_state_dir()
    try:
        d, pem = state / "audit", state / "device.pem"
        gen_s = 0.0
        if keep is None or not pem.exists():
            say(f"scale: generating an audit log of {records:,} records (no fsync, 32 appenders)")
            t0 = time.monotonic()
            _py(_GEN, str(d), str(records), str(pem))
            gen_s = time.monotonic() - t0
        paths = files.list_files(d)
        nbytes = sum(p.stat().st_size for p in paths)
        _evict(paths)
        disk = _direct_read_mb_s(paths)
        _evict(paths)
        say(f"scale: audit verify of {nbytes / 1e6:,.0f} MB in {len(paths)} files, cold cache")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        text = _py(_VERIFY, str(d), str(pem), *([str(jobs)] if jobs else []))
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        r = json.loads(text)
        rate = nbytes / r["s"] / 1e6 if r["s"] else None
        out = {"records": r["records"], "ok": r["ok"], "files": r["files"],
               "processes": r.get("processes"),
               "checkpoints": r["checkpoints"], "bytes": nbytes, "generate_s": round(gen_s, 1),
               "verify_s": round(r["s"], 2),
               "verify_records_per_s": round(r["records"] / r["s"]) if r["s"] else None,
               "verify_mb_s": _r(rate), "disk_sequential_mb_s": _r(disk),
               "verify_vs_disk": round(rate / disk, 3) if rate and disk else None,
               "verify_cpu_s": round(r["cpu_s"], 2),
               "verify_cpu_ms_per_mb": round(r["cpu_s"] / (nbytes / 1e6) * 1e3, 2),
               # RUSAGE_CHILDREN is the max over all children so far: an upper bound.
               "verify_peak_rss_kib_upper_bound": max(before, peak)}
        say(f"scale: verify {out['verify_mb_s']} MB/s ({out['verify_records_per_s']:,} records/s),"
            f" disk {out['disk_sequential_mb_s']} MB/s sequential (O_DIRECT); "
            f"{r['processes']} processes, CPU {out['verify_cpu_s']} s = "
            f"{out['verify_cpu_ms_per_mb']} ms/MB")
        return out
    finally:
        if keep is None:
            provision.cleanup(state)


def run_verify(say: Say, *, quick: bool = False, keep: Path | None = None,
               repeats: int = 1, jobs: int | None = None) -> dict[str, Any]:
    """``--scale-only verify``: only the ``audit verify`` row, ``repeats`` times, cold each time."""
    runs = [audit_verify(100_000 if quick else 1_000_000, say, keep=keep, jobs=jobs)
            for _ in range(max(1, repeats) if keep is not None else 1)]
    best = max(runs, key=lambda r: r.get("verify_mb_s") or 0)
    out: dict[str, Any] = {"audit_verify": best, "runs": runs}
    out["targets"] = _targets(out)
    return out


def verify_lines(out: dict[str, Any]) -> list[str]:
    """:func:`lines`' audit verify (best run) and target rows, then every run."""
    if out.get("error"):
        return ["", f"scale verify: not available ({str(out['error'])[:200]})"]
    res = [""] + [x for x in lines({"durability": "-", "duration_s": 0, **out})
                  if x.startswith(("  audit verify", "  #22 target"))]
    for r in out.get("runs", []) if len(out.get("runs", [])) > 1 else []:
        res.append(f"  run: {r['verify_mb_s']} MB/s, {r['verify_vs_disk']}x disk, "
                   f"CPU {r['verify_cpu_ms_per_mb']} ms/MB")
    return res


# -- report ------------------------------------------------------------------------------


def _targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = out.get("steps", [])
    base = next((r for r in rows if r["what"] == "baseline"), None)
    both = next((r for r in rows if r["what"] == "agents+rules"), None)
    t: list[dict[str, Any]] = []
    if base and both and base["p50_us"]:
        v = both["p50_us"] / base["p50_us"]
        t.append({"target": f"FetchToken p50 with {both['n']} agents and {both['rules']} rules / "
                            "1 agent", "value": round(v, 2), "goal": "<= 1.2", "met": v <= 1.2})
    if out.get("start_agents_s") is not None:
        v = out["start_agents_s"]
        t.append({"target": f"start-up with {out['start_many']['agents']} agents (s)",
                  "value": v, "goal": "< 2", "met": v < 2})
    av = out.get("audit_verify", {})
    if av.get("verify_vs_disk") is not None:
        v = av["verify_vs_disk"]
        t.append({"target": "audit verify / disk sequential read rate", "value": v,
                  "goal": ">= 0.30", "met": v >= 0.30})
    return t


def lines(out: dict[str, Any]) -> list[str]:
    if not out:
        return []
    if out.get("error"):
        return ["", f"scale: not available ({str(out['error'])[:200]})"]
    res = ["", f"scale (one sequential lean client, FetchToken, daemon in audit durability "
               f"{out['durability']} mode; {out['duration_s']:g}s per step):"]
    base = next((r for r in out.get("steps", []) if r["what"] == "baseline"), None)
    for r in out.get("steps", []):
        rel = f" ({r['p50_us'] / base['p50_us']:.2f}x baseline)" if base and base["p50_us"] else ""
        extra = "".join(f", {k} {r[k]}" for k in ("rules", "agents", "reload_s") if k in r)
        res.append(f"  {r['what']:>16} {r['n']:>6}: p50 {r['p50_us']:>7,.0f} µs{rel}, p99 "
                   f"{r['p99_us']:>7,.0f} µs, RSS {r['rss_kib'] or 0:>7,} KiB{extra}"
                   + (f" ERROR {r['error']}" if r.get("error") else ""))
    res.append(f"  start-up to ready: {out.get('start_1_agent_s')} s with 1 agent; "
               f"{out.get('start_agents_s')} s with {out.get('start_many', {}).get('agents')} "
               "agents; "
               f"{out.get('start_many_s')} s with {out.get('start_many', {}).get('agents')} "
               f"agents and {out.get('start_many', {}).get('rules')} rules; agents created at "
               f"{out.get('agents_created_per_s')}/s")
    held = out.get("held", {})
    res.append(f"  held connections: up to {held.get('max_held')} from {held.get('from')}"
               + (f"; {held['error']}" if held.get("error") else ""))
    av = out.get("audit_verify", {})
    if av.get("error"):
        res.append(f"  audit verify: not available ({av['error'][:200]})")
    elif av:
        res.append(f"  audit verify: {av['records']:,} records, {av['bytes'] / 1e6:,.0f} MB in "
                   f"{av['files']} files, cold cache, {av.get('processes')} process(es): "
                   f"{av['verify_s']} s = "
                   f"{av['verify_records_per_s']:,} records/s = {av['verify_mb_s']} MB/s; disk "
                   f"sequential read {av['disk_sequential_mb_s']} MB/s (O_DIRECT): "
                   f"{av['verify_vs_disk']}x; peak RSS <= "
                   f"{av['verify_peak_rss_kib_upper_bound']:,} KiB; ok={av['ok']}"
                   + (f"; CPU (user+sys, with workers) {av['verify_cpu_s']} s = "
                      f"{av['verify_cpu_ms_per_mb']} ms/MB" if "verify_cpu_s" in av else ""))
    for t in out.get("targets", []):
        mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        res.append(f"  #22 target: {t['target']}: {t['value']} (goal {t['goal']}) — {mark}")
    return res


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)
