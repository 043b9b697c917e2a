"""The multi-process ceiling: two independent badged daemons side by side.

One badged process tops out at one core (the GIL), so the obvious way to the
issue's throughput targets is several processes. Before building that, this
measures its upper bound on *this* machine: two complete daemons, each with
its own token, policy, rate budgets and audit log, share nothing and talk to
nobody, and the 16 clients are split 8 + 8 between them. No design with
worker processes can beat that for the same per-call work: a real one adds
IPC and keeps decisions and the audit chain in one place. If the pair does
not reach a target, the target needs less work per call, not more
processes.

Rounds alternate (ABBA, as in ``paired``) between ssh-agent at 16 clients,
one daemon at 16 clients and the pair at 8 + 8; each ratio is the median over
rounds. Machine CPU is recorded per run, so "the pair used both cores" is
visible rather than assumed.
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


def run_ceiling(*, rounds: int, duration_s: float, warmup_s: float, slice_s: float,
                ssh: OpSpec, ssh_pid: int | None, fetch: OpSpec, sign: OpSpec,
                badged_pid: int | None, src: Path, say: Say,
                clients: int = 16) -> dict[str, Any]:
    """Start a second daemon on its own token, run the rounds, stop and wipe it.

    ``clients`` is split evenly between the two daemons in the "two" runs.
    """
    state = provision.make_state_dir()
    second = Badged(state, src)
    try:
        ready_s = second.start()
        say(f"ceiling: second badged ready in {ready_s:.2f}s (own token and state in {state})")
        sock2 = str(second.socket)
        fetch2 = OpSpec(fetch.kind, {**fetch.params, "socket": sock2})
        sign2 = OpSpec(sign.kind, {**sign.params, "socket": sock2})
        pids = tuple(p for p in (badged_pid, second.pid) if p)
        seq: list[tuple[str, list[OpSpec], int | tuple[int, ...] | None]] = [
            ("ssh-agent", [ssh], ssh_pid),
            ("FetchToken one", [fetch], badged_pid),
            ("FetchToken two", [fetch, fetch2], pids),
            ("Sign one", [sign], badged_pid),
            ("Sign two", [sign, sign2], pids),
        ]
        per_round: list[dict[str, Any]] = []
        for r in range(rounds):
            runs: dict[str, dict[str, float | None]] = {}
            for name, specs, pid in (seq if r % 2 == 0 else seq[::-1]):
                res = run_load(specs, clients, duration_s=duration_s, slice_s=slice_s,
                               warmup_s=warmup_s, server_pid=pid)
                if res.error:
                    raise RuntimeError(f"{name}@{clients}: {res.error}")
                runs[name] = {"ops_per_s": round(res.median_slice_ops_per_s, 1),
                              "p50_us": round(res.p50_us, 1), "p99_us": round(res.p99_us, 1),
                              "server_cpu_us_per_op": _r(res.server_cpu_us_per_op),
                              "machine_busy_cores": _r(res.machine_busy_cores),
                              "other_cpu": _r(other_cpu(res))}
            ssh16 = runs["ssh-agent"]["ops_per_s"]
            ratios = {
                "fetch_one_vs_ssh": _div(runs["FetchToken one"]["ops_per_s"], ssh16),
                "fetch_two_vs_ssh": _div(runs["FetchToken two"]["ops_per_s"], ssh16),
                "sign_one_vs_ssh": _div(runs["Sign one"]["ops_per_s"], ssh16),
                "sign_two_vs_ssh": _div(runs["Sign two"]["ops_per_s"], ssh16),
                "fetch_two_vs_one": _div(runs["FetchToken two"]["ops_per_s"],
                                         runs["FetchToken one"]["ops_per_s"]),
                "sign_two_vs_one": _div(runs["Sign two"]["ops_per_s"],
                                        runs["Sign one"]["ops_per_s"]),
            }
            say(f"ceiling round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in ratios.items() if v is not None))
            per_round.append({"runs": runs, "ratios": ratios})
        keys = per_round[0]["ratios"].keys()
        median = {k: _median([p["ratios"][k] for p in per_round]) for k in keys}
        return {"rounds": per_round, "median": median, "duration_s": duration_s,
                "clients": clients, "second_state_dir": str(state)}
    finally:
        second.stop()
        provision.cleanup(state)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
