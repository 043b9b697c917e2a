"""Paired A/B of two badged source trees (regression hunting, issue 22).

    bash bench/run --ab OTHER_TREE [--pair-rounds N] [--duration S]

Both daemons (``badged dev``, each on its own fresh SoftHSM token with the
same P-256 setup) stay up side by side, run by the same interpreter and
dependencies; the runs alternate A/B in ABBA order across rounds, so load from
other people's work falls on both alike. Each round measures FetchToken@1
(p50), FetchToken@16 and Sign@16 (median 1 s slice ops/s); the report gives
per-target B/A medians with their spread over rounds. A is this tree (or
--badged-src), B is OTHER_TREE.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from badgebench import procfs, provision
from badgebench.load import run_load
from badgebench.ops import OpSpec
from badgebench.servers import Badged

Say = Callable[[str], None]
TARGETS = (("FetchToken@1 p50_us", "fetch", 1, "p50_us"),
           ("FetchToken@16 ops/s", "fetch", 16, "ops_per_s"),
           ("Sign@16 ops/s", "sign", 16, "ops_per_s"),
           # The daemon's CPU per call: robust to other people's load, unlike a rate.
           ("FetchToken@1 server_cpu_us", "fetch", 1, "server_cpu_us"),
           ("FetchToken@16 server_cpu_us", "fetch", 16, "server_cpu_us"),
           ("Sign@16 server_cpu_us", "sign", 16, "server_cpu_us"))
RUNS = (("fetch", 1), ("fetch", 16), ("sign", 16))


def run_ab(*, a_src: Path, b_src: Path, module: str, audience: str, rounds: int,
           duration_s: float, warmup_s: float, slice_s: float, say: Say) -> dict[str, Any]:
    states: list[Path] = []
    daemons: list[Badged] = []
    try:
        specs: dict[str, dict[str, OpSpec]] = {}
        pids: dict[str, int | None] = {}
        for name, src in (("A", a_src), ("B", b_src)):
            state = provision.make_state_dir()
            states.append(state)
            token = provision.provision_token(state, module)
            os.environ.update(token.env)  # the daemon started next inherits its own token
            d = Badged(state, src)
            daemons.append(d)
            ready = d.start()
            say(f"{name} = {src}: ready in {ready:.2f}s")
            sock = str(d.socket)
            specs[name] = {
                "fetch": OpSpec("badged-fetch", {"socket": sock, "audience": audience,
                                                 "scopes": "read", "ttl": "60"}),
                "sign": OpSpec("badged-sign", {"socket": sock})}
            pids[name] = d.pid
        per_round: list[dict[str, Any]] = []
        for r in range(rounds):
            runs: dict[str, dict[str, float]] = {}
            for kind, n in RUNS:
                order = ("A", "B") if r % 2 == 0 else ("B", "A")
                for side in order:
                    res = run_load([specs[side][kind]], n, duration_s=duration_s,
                                   slice_s=slice_s, warmup_s=warmup_s, server_pid=pids[side])
                    if res.error:
                        raise RuntimeError(f"{side} {kind}@{n}: {res.error}")
                    runs[f"{side} {kind}@{n}"] = {
                        "ops_per_s": round(res.median_slice_ops_per_s, 1),
                        "p50_us": round(res.p50_us, 1), "p99_us": round(res.p99_us, 1),
                        "server_cpu_us": round(res.server_cpu_us_per_op or 0.0, 1),
                        "load1": res.loadavg_before[0] if res.loadavg_before else 0.0}
            ratios = {label: runs[f"B {kind}@{n}"][field] / runs[f"A {kind}@{n}"][field]
                      for label, kind, n, field in TARGETS}
            say(f"round {r + 1}/{rounds} (load {procfs.loadavg()}): " + ", ".join(
                f"{label} A {runs[f'A {kind}@{n}'][field]:,.0f} B "
                f"{runs[f'B {kind}@{n}'][field]:,.0f} (B/A {ratios[label]:.3f})"
                for label, kind, n, field in TARGETS))
            per_round.append({"runs": runs, "ratios": ratios})
        summary: dict[str, Any] = {}
        for label, kind, n, field in TARGETS:
            rs = sorted(p["ratios"][label] for p in per_round)
            a = [p["runs"][f"A {kind}@{n}"][field] for p in per_round]
            b = [p["runs"][f"B {kind}@{n}"][field] for p in per_round]
            summary[label] = {"median_ratio_B_over_A": round(statistics.median(rs), 3),
                              "ratio_min": round(rs[0], 3), "ratio_max": round(rs[-1], 3),
                              "ratio_iqr": _iqr(rs), "A_median": statistics.median(a),
                              "B_median": statistics.median(b)}
            say(f"{label}: A {statistics.median(a):,.1f} B {statistics.median(b):,.1f}; "
                f"B/A median {statistics.median(rs):.3f} (min {rs[0]:.3f}, max {rs[-1]:.3f}, "
                f"IQR {_iqr(rs)})")
        return {"a": str(a_src), "b": str(b_src), "rounds": per_round, "summary": summary,
                "duration_s": duration_s}
    finally:
        for d in daemons:
            d.stop()
        for s in states:
            provision.cleanup(s)


def _iqr(sorted_vals: list[float]) -> tuple[float, float]:
    if len(sorted_vals) < 4:
        return (round(sorted_vals[0], 3), round(sorted_vals[-1], 3))
    q = statistics.quantiles(sorted_vals, n=4)
    return (round(q[0], 3), round(q[2], 3))
