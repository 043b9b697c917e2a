"""Both audit durability modes, side by side (issue 22 item 2).

``[audit] durability = "fsync"`` (the default) syncs each record before the
answer; ``"write"`` writes it before the answer and syncs it in the
background within 50 ms (docs/audit.md, "Durability modes"). The run's main
daemon is the fsync one; here a second, independent ``badged dev
--audit-durability write`` (own token and state dir, same filesystem) is
started beside it, and the runs alternate (ABBA) with ssh-agent: sequential
p50 (one client) for both modes, and throughput at 16 clients. Each ratio is
the median over rounds. The header's fdatasync line says what the fsync
mode pays per lone call on this filesystem.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from badgebench import provision
from badgebench.load import run_load
from badgebench.ops import OpSpec
from badgebench.report import other_cpu
from badgebench.servers import Badged

Say = Callable[[str], None]


def run_durability(*, rounds: int, duration_s: float, warmup_s: float, slice_s: float,
                   ssh: OpSpec, ssh_pid: int | None, fetch: OpSpec, sign: OpSpec,
                   badged_pid: int | None, src: Path, say: Say) -> dict[str, Any]:
    state = provision.make_state_dir()
    second = Badged(state, src, ("--audit-durability", "write"))
    try:
        ready_s = second.start()
        say(f"durability: badged --audit-durability write ready in {ready_s:.2f}s ({state})")
        sock = str(second.socket)
        wfetch = OpSpec(fetch.kind, {**fetch.params, "socket": sock})
        wsign = OpSpec(sign.kind, {**sign.params, "socket": sock})
        wpid = second.pid
        seq: list[tuple[str, OpSpec, int | None, int]] = [
            ("ssh-agent@1", ssh, ssh_pid, 1),
            ("FetchToken fsync@1", fetch, badged_pid, 1),
            ("FetchToken write@1", wfetch, wpid, 1),
            ("ssh-agent@16", ssh, ssh_pid, 16),
            ("FetchToken fsync@16", fetch, badged_pid, 16),
            ("FetchToken write@16", wfetch, wpid, 16),
            ("Sign fsync@16", sign, badged_pid, 16),
            ("Sign write@16", wsign, wpid, 16),
        ]
        per_round: list[dict[str, Any]] = []
        for r in range(rounds):
            runs: dict[str, dict[str, float | None]] = {}
            for name, spec, pid, n in (seq if r % 2 == 0 else seq[::-1]):
                res = run_load([spec], n, duration_s=duration_s, slice_s=slice_s,
                               warmup_s=warmup_s, server_pid=pid)
                if res.error:
                    raise RuntimeError(f"{name}: {res.error}")
                runs[name] = {"ops_per_s": round(res.median_slice_ops_per_s, 1),
                              "p50_us": round(res.p50_us, 1), "p99_us": round(res.p99_us, 1),
                              "other_cpu": _r(other_cpu(res))}
            s1, s16 = runs["ssh-agent@1"], runs["ssh-agent@16"]
            ratios: dict[str, float | None] = {}
            for mode in ("fsync", "write"):
                ratios[f"fetch1_p50_vs_ssh1_{mode}"] = _div(
                    runs[f"FetchToken {mode}@1"]["p50_us"], s1["p50_us"])
                ratios[f"fetch16_vs_ssh16_{mode}"] = _div(
                    runs[f"FetchToken {mode}@16"]["ops_per_s"], s16["ops_per_s"])
                ratios[f"sign16_vs_ssh16_{mode}"] = _div(
                    runs[f"Sign {mode}@16"]["ops_per_s"], s16["ops_per_s"])
            say(f"durability round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in ratios.items() if v is not None))
            per_round.append({"runs": runs, "ratios": ratios})
        keys = per_round[0]["ratios"].keys()
        median = {k: _median([p["ratios"][k] for p in per_round]) for k in keys}
        p50 = {name: _median([p["runs"][name]["p50_us"] for p in per_round])
               for name in per_round[0]["runs"]}
        return {"rounds": per_round, "median": median, "median_p50_us": p50,
                "duration_s": duration_s}
    finally:
        second.stop()
        provision.cleanup(state)


def lines(d: dict[str, Any]) -> list[str]:
    """The block as text: heading, medians per mode, each round's p50s."""
    if d.get("error"):
        return ["", f"durability modes: not available ({str(d['error'])[:160]})"]
    if not d.get("rounds"):
        return []
    med, p50 = d["median"], d["median_p50_us"]

    def f(key: str) -> str:
        v = med.get(key)
        return "n/a" if v is None else f"{v:.2f}x"

    out = ["", f"audit durability modes (two daemons, ABBA with ssh-agent, median of "
               f"{len(d['rounds'])} rounds, {d['duration_s']:g}s per run):"]
    for mode, goal in (("fsync", "<= 1.5x"), ("write", "<= 1.0x")):
        out.append(f"  {mode:5}: sequential FetchToken p50 {p50.get(f'FetchToken {mode}@1') or 0:,.0f}"
                   f" µs = {f(f'fetch1_p50_vs_ssh1_{mode}')} ssh-agent's "
                   f"{p50.get('ssh-agent@1') or 0:,.0f} µs (goal {goal}); FetchToken@16 "
                   f"{f(f'fetch16_vs_ssh16_{mode}')} (goal >= 2x), Sign@16 "
                   f"{f(f'sign16_vs_ssh16_{mode}')} (goal >= 2.5x) ssh-agent@16")
    return out


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
