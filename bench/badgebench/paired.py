"""Paired rounds: ssh-agent and badged measured alternately, for robust ratios.

On a shared machine, other people's load comes and goes over minutes. The main
table measures every peer, then badged, so a ratio between two of its rows
can be skewed by noise that hit only one of them. Here both servers stay up
and the runs behind the issue's targets alternate (ABBA order across rounds),
so noise falls on both sides alike; each target is the median over rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from badgebench.load import run_load
from badgebench.ops import OpSpec
from badgebench.report import other_cpu

Say = Callable[[str], None]


def run_paired(*, rounds: int, duration_s: float, warmup_s: float, slice_s: float,
               ssh: OpSpec, ssh_pid: int | None, fetch: OpSpec, sign: OpSpec,
               badged_pid: int | None, say: Say) -> dict[str, Any]:
    seq: list[tuple[str, OpSpec, int | None, int]] = [
        ("ssh-agent", ssh, ssh_pid, 1), ("FetchToken", fetch, badged_pid, 1),
        ("ssh-agent", ssh, ssh_pid, 16), ("FetchToken", fetch, badged_pid, 16),
        ("Sign", sign, badged_pid, 16),
    ]
    per_round: list[dict[str, Any]] = []
    for r in range(rounds):
        runs: dict[str, dict[str, float | None]] = {}
        for name, spec, pid, n in (seq if r % 2 == 0 else seq[::-1]):
            res = run_load([spec], n, duration_s=duration_s, slice_s=slice_s, warmup_s=warmup_s,
                           server_pid=pid)
            if res.error:
                raise RuntimeError(f"{name}@{n}: {res.error}")
            runs[f"{name}@{n}"] = {"ops_per_s": round(res.median_slice_ops_per_s, 1),
                                   "p50_us": round(res.p50_us, 1), "p99_us": round(res.p99_us, 1),
                                   "other_cpu": _r(other_cpu(res))}
        s1, s16 = runs["ssh-agent@1"], runs["ssh-agent@16"]
        f1, f16, g16 = runs["FetchToken@1"], runs["FetchToken@16"], runs["Sign@16"]
        ratios = {
            "fetch16_vs_ssh16": _div(f16["ops_per_s"], s16["ops_per_s"]),
            "sign16_vs_ssh16": _div(g16["ops_per_s"], s16["ops_per_s"]),
            "fetch1_p50_vs_ssh1_p50": _div(f1["p50_us"], s1["p50_us"]),
            "fetch16_p99_ms": (f16["p99_us"] or 0) / 1000,
            "sign16_p99_ms": (g16["p99_us"] or 0) / 1000,
        }
        say(f"paired round {r + 1}/{rounds}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                          ratios.items() if v is not None))
        per_round.append({"runs": runs, "ratios": ratios})
    keys = per_round[0]["ratios"].keys()
    median = {k: round(statistics.median(p["ratios"][k] for p in per_round), 3) for k in keys}
    return {"rounds": per_round, "median": median, "duration_s": duration_s}


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
