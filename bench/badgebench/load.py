"""Closed-loop load generator: N spawned processes, one persistent client each.

Every worker connects and checks one real answer, then reports ready. The
parent sets one start time for all (after a warm-up under full load) and one
end time; each worker times each call with the monotonic clock (shared by all
processes on Linux), counts completions per time slice (so a noisy second is
visible as a slow slice) and measures its own CPU time over the window. The
parent meanwhile samples the server's process tree and the whole machine.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import statistics
import time
import traceback
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from badgebench import procfs
from badgebench.ops import OpSpec, make, preload

SETUP_RETRIES = 5


@dataclass
class LoadResult:
    clients: int
    ops: int = 0
    wall_s: float = 0.0
    ops_per_s: float = 0.0
    slice_ops_per_s: list[float] = field(default_factory=list)
    median_slice_ops_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    mean_us: float = 0.0
    max_us: float = 0.0
    loadgen_cpu_cores: float = 0.0
    loadgen_cpu_us_per_op: float = 0.0
    server_cpu_cores: float | None = None
    server_cpu_us_per_op: float | None = None
    machine_busy_cores: float = 0.0
    loadavg_before: list[float] = field(default_factory=list)
    loadavg_after: list[float] = field(default_factory=list)
    setup_retries: int = 0
    error: str | None = None


def _worker(spec: OpSpec, conn: Connection) -> None:
    try:
        preload(spec)  # imports in parallel with the other workers
    except Exception as exc:
        _send(conn, ("error", f"{type(exc).__name__}: {exc}"))
        return
    # Set-up (log in, connect) one worker at a time: many processes logging in
    # to one file-backed SoftHSM token at the same instant race on its files.
    if not _send(conn, ("spawned", 0)):
        return
    try:
        if conn.recv()[0] != "setup":
            return
    except EOFError:
        return
    retries = 0
    while True:
        try:
            op, close = make(spec)
            for _ in range(3):
                op()
            break
        except Exception as exc:
            # Many processes opening one file-backed SoftHSM token at the same
            # instant sometimes get CKR_GENERAL_ERROR or see no token (measured
            # with p11-kit's per-connection children). Set-up is not timed:
            # retry with jitter, and report how often it happened.
            retries += 1
            if retries > SETUP_RETRIES:
                _send(conn, ("error", f"{type(exc).__name__}: {exc} (after {retries} tries)\n"
                                      f"{traceback.format_exc(limit=3)}"))
                return
            time.sleep(0.05 * retries + random.random() * 0.1)
    if not _send(conn, ("ready", retries)):
        close()
        return
    try:
        msg = conn.recv()
    except EOFError:
        msg = ("stop",)
    if msg[0] != "go":
        close()
        return
    start_ns, end_ns, slice_ns, count = msg[1:]
    mono = time.monotonic_ns
    lat = array("q")
    nslices = max(1, -(-(end_ns - start_ns) // slice_ns))
    slices = [0] * nslices
    try:
        while mono() < start_ns:  # warm-up at full load
            op()
        cpu0 = time.process_time_ns()
        t_start = mono()
        if count:
            for _ in range(count):
                t0 = mono()
                op()
                lat.append(mono() - t0)
            t_end = mono()
        else:
            append = lat.append
            while True:
                t0 = mono()
                if t0 >= end_ns:
                    break
                op()
                t1 = mono()
                append(t1 - t0)
                slices[min(nslices - 1, (t1 - start_ns) // slice_ns)] += 1
            t_end = mono()
        cpu1 = time.process_time_ns()
    except Exception as exc:
        _send(conn, ("error", f"{type(exc).__name__}: {exc}"))
        return
    finally:
        try:
            close()
        except Exception:
            pass
    _send(conn, ("done", lat.tobytes(), slices, cpu1 - cpu0, t_start, t_end))


def _send(conn: Connection, msg: tuple[Any, ...]) -> bool:
    """Send to the parent; False if it is gone (it gave up on this run)."""
    try:
        conn.send(msg)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return False
    return True


def _server_cpu(pids: int | tuple[int, ...] | None) -> float:
    if not pids:
        return 0.0
    return sum(procfs.tree_cpu_seconds(p) for p in ((pids,) if isinstance(pids, int) else pids))


def _percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return 0.0
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return float(sorted_vals[idx])


def run_load(specs: list[OpSpec], clients: int, *, duration_s: float, slice_s: float = 1.0,
             warmup_s: float = 0.5, count_per_client: int = 0,
             server_pid: int | tuple[int, ...] | None = None,
             setup_timeout_s: float = 120.0) -> LoadResult:
    """Run ``clients`` workers (spec ``i % len(specs)`` for worker i) and aggregate.

    With ``count_per_client`` each worker does exactly that many calls instead
    of running for ``duration_s`` (used for the RSS soak). ``server_pid`` may
    name several servers (the ceiling runs): their CPU is summed.
    """
    ctx = mp.get_context("spawn")
    res = LoadResult(clients=clients, loadavg_before=procfs.loadavg())
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        for i in range(clients):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(specs[i % len(specs)], child), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        deadline = time.monotonic() + setup_timeout_s
        for c in conns:  # all spawned and imported
            if not c.poll(max(0.1, deadline - time.monotonic())):
                raise TimeoutError("a load-generator worker did not start in time")
            msg = c.recv()
            if msg[0] == "error":
                raise RuntimeError(msg[1])
        for c in conns:  # then set up one at a time
            c.send(("setup",))
            if not c.poll(max(0.1, deadline - time.monotonic())):
                raise TimeoutError("a load-generator worker did not get ready in time")
            msg = c.recv()
            if msg[0] == "error":
                raise RuntimeError(msg[1])
            res.setup_retries += int(msg[1])
        slice_ns = int(slice_s * 1e9)
        start_ns = time.monotonic_ns() + int(warmup_s * 1e9)
        end_ns = start_ns + int((0 if count_per_client else duration_s) * 1e9)
        for c in conns:
            c.send(("go", start_ns, end_ns, slice_ns, count_per_client))
        time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        m0 = procfs.MachineSample.now()
        s0 = _server_cpu(server_pid)
        w0 = time.monotonic()
        if not count_per_client:  # sample the server and machine at the end time
            time.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9))
            wall = time.monotonic() - w0
            m1 = procfs.MachineSample.now()
            s1 = _server_cpu(server_pid)
        results = []
        for c in conns:
            timeout = 600.0 if count_per_client else duration_s + 120.0
            if not c.poll(timeout):
                raise TimeoutError("a load-generator worker did not finish in time")
            msg = c.recv()
            if msg[0] == "error":
                raise RuntimeError(msg[1])
            results.append(msg)
        if count_per_client:
            wall = time.monotonic() - w0
            m1 = procfs.MachineSample.now()
            s1 = _server_cpu(server_pid)
    except (RuntimeError, TimeoutError, OSError, EOFError) as exc:
        res.error = " | ".join(str(exc).strip().splitlines())[:600] or repr(exc)
        return res
    finally:
        for c in conns:
            try:
                c.close()
            except OSError:
                pass
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    res.loadavg_after = procfs.loadavg()

    lats: list[int] = []
    slices = [0] * max(len(r[2]) for r in results)
    cpu_ns = 0
    for _, lat_bytes, sl, cpu, _t0, _t1 in results:
        a = array("q")
        a.frombytes(lat_bytes)
        lats.extend(a)
        for i, n in enumerate(sl):
            slices[i] += n
        cpu_ns += cpu
    if count_per_client:
        window_ns = max(r[5] for r in results) - min(r[4] for r in results)
    else:
        window_ns = end_ns - start_ns
    window = window_ns / 1e9
    lats.sort()
    res.ops = len(lats)
    res.wall_s = round(window, 3)
    res.ops_per_s = res.ops / window if window > 0 else 0.0
    if not count_per_client:
        last = duration_s - slice_s * (len(slices) - 1)
        res.slice_ops_per_s = [n / (slice_s if i < len(slices) - 1 else max(last, 1e-9))
                               for i, n in enumerate(slices)]
        res.median_slice_ops_per_s = statistics.median(res.slice_ops_per_s)
    else:
        res.median_slice_ops_per_s = res.ops_per_s
    res.p50_us = _percentile(lats, 0.50) / 1e3
    res.p99_us = _percentile(lats, 0.99) / 1e3
    res.mean_us = (sum(lats) / len(lats) / 1e3) if lats else 0.0
    res.max_us = (lats[-1] / 1e3) if lats else 0.0
    res.loadgen_cpu_cores = cpu_ns / 1e9 / window if window > 0 else 0.0
    res.loadgen_cpu_us_per_op = cpu_ns / 1e3 / res.ops if res.ops else 0.0
    res.machine_busy_cores = m1.busy_cores_since(m0, wall)
    if server_pid:
        res.server_cpu_cores = (s1 - s0) / wall if wall > 0 else 0.0
        res.server_cpu_us_per_op = (s1 - s0) * 1e6 / res.ops if res.ops else 0.0
    return res
