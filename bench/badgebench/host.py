"""What a run's numbers depend on, measured at its start: the benchmark header.

Issue 22: a fresh clone on a quiet machine of the same kind did not reproduce
the documented ratios, and the difference was in things the old header did
not report: how long an ``fdatasync`` of a small append takes on the state
dir's filesystem (badged's audit log pays one per lone call), the CPU, and
the dependency versions pip actually resolved. So every run now states them,
and says when the installed packages differ from the hash-checked lock.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def fsync_latency(directory: Path, count: int = 200, size: int = 300) -> dict[str, Any]:
    """p50/p99 of ``count`` appends of ``size`` bytes, each followed by a sync.

    The same pattern as the audit log's lone call (one record, then one
    sync), on the filesystem of ``directory``: fdatasync and fsync both,
    since either may be what a deployment pays. Monotonic clock, µs.
    """
    out: dict[str, Any] = {"directory": str(directory), "appends": count, "bytes": size,
                           "filesystem": filesystem_of(directory)}
    line = (b"x" * (size - 1)) + b"\n"
    for name, sync in (("fdatasync", os.fdatasync), ("fsync", os.fsync)):
        fd, path = tempfile.mkstemp(prefix=".bench-sync-", dir=directory)
        try:
            times: list[float] = []
            for _ in range(count):
                t0 = time.perf_counter_ns()
                os.write(fd, line)
                sync(fd)
                times.append((time.perf_counter_ns() - t0) / 1000)
        finally:
            os.close(fd)
            os.unlink(path)
        times.sort()
        out[name] = {"p50_us": round(statistics.median(times), 1),
                     "p99_us": round(times[min(len(times) - 1, int(len(times) * 0.99))], 1),
                     "max_us": round(times[-1], 1)}
    return out


def filesystem_of(path: Path) -> str:
    """``fstype device`` of the mount holding ``path`` (longest mount-point prefix)."""
    best, best_len = "unknown", -1
    try:
        real = os.path.realpath(path)
        for row in Path("/proc/self/mounts").read_text().splitlines():
            parts = row.split()
            if len(parts) < 4:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best_len:
                best, best_len = f"{parts[2]} on {mnt} ({parts[0]}, {parts[3][:60]})", len(mnt)
    except OSError:
        pass
    return best


def cpu() -> dict[str, Any]:
    model = "unknown"
    flags: set[str] = set()
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = row.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    mhz = None
    try:
        mhz = round(int(Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
                        .read_text()) / 1000)
    except (OSError, ValueError):
        pass
    return {"model": model, "count": os.cpu_count(),
            "usable": len(os.sched_getaffinity(0)), "mhz": mhz,
            "hypervisor": "hypervisor" in flags}


def locked_versions(lock: Path) -> dict[str, str]:
    """``name -> version`` pinned in a pip-compile lock (hash lines skipped)."""
    out: dict[str, str] = {}
    try:
        text = lock.read_text()
    except OSError:
        return out
    for row in text.splitlines():
        m = _LOCK_LINE.match(row.strip())
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependencies(repo: Path) -> dict[str, Any]:
    """Installed version of every package of the lock, and whether they all match it."""
    import importlib.metadata as md

    lock = locked_versions(repo / ".ci" / "lock" / "requirements.txt")
    installed: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata.get("Name")
        if name:
            installed[_norm(name)] = dist.version
    mismatch = {n: {"lock": v, "installed": installed.get(n, "absent")}
                for n, v in sorted(lock.items()) if installed.get(n) != v}
    return {"lock_file": str(repo / ".ci" / "lock" / "requirements.txt") if lock else None,
            "locked": len(lock),
            "versions": {n: installed.get(n, "absent") for n in sorted(lock)} if lock
            else dict(sorted(installed.items())),
            "matches_lock": None if not lock else not mismatch,
            "mismatch": mismatch}


def describe(repo: Path, state_dir: Path, *, fsync_count: int = 200) -> dict[str, Any]:
    """Everything the header prints, as JSON-ready data."""
    return {"cpu": cpu(), "kernel": platform.release(),
            "python": f"{platform.python_implementation()} {platform.python_version()} "
                      f"({sys.executable})",
            "sync": fsync_latency(state_dir, count=fsync_count),
            "dependencies": dependencies(repo),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def tool_version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0][:100] if text else "?"


def header_lines(host: dict[str, Any], versions: dict[str, str],
                 loadavg_after: list[float] | None = None) -> list[str]:
    """The header as text lines (stdout and the Markdown section)."""
    c, s, d = host["cpu"], host["sync"], host["dependencies"]
    ncpu = c["count"] or 1
    before = host["loadavg_before"]
    busy = before[0] > ncpu / 2 or (loadavg_after is not None and loadavg_after[0] > ncpu / 2)
    lines = [
        f"machine: {c['model']}, {c['count']} CPUs ({c['usable']} usable"
        + (f", {c['mhz']} MHz" if c["mhz"] else "")
        + (", virtualised" if c["hypervisor"] else "") + f"), kernel {host['kernel']}",
        f"python: {host['python']}",
        f"state dir filesystem: {s['filesystem']}",
        f"sync of a {s['bytes']}-byte append ({s['appends']}x): fdatasync p50 "
        f"{s['fdatasync']['p50_us']:,.0f} µs p99 {s['fdatasync']['p99_us']:,.0f} µs; fsync p50 "
        f"{s['fsync']['p50_us']:,.0f} µs p99 {s['fsync']['p99_us']:,.0f} µs",
        f"tools: {versions.get('openssl')}; {versions.get('openssh')}; SoftHSM "
        f"{versions.get('softhsm')}; badged {versions.get('badged_commit')}",
    ]
    deps = d["versions"]
    key = ("grpcio", "protobuf", "cryptography", "python-pkcs11", "orjson", "h2", "hpack")
    lines.append("dependencies: " + ", ".join(f"{k} {deps[k]}" for k in key if k in deps)
                 + f" (+{max(0, len(deps) - len(key))} more in the JSON)")
    if d["matches_lock"] is None:
        lines.append("lock: no .ci/lock/requirements.txt found; versions not checked")
    elif d["matches_lock"]:
        lines.append(f"lock: all {d['locked']} locked packages installed at their locked "
                     "versions")
    else:
        lines.append(f"lock: {len(d['mismatch'])} of {d['locked']} packages DIFFER from the lock: "
                     + ", ".join(f"{n} {m['installed']} (lock {m['lock']})"
                                 for n, m in list(d["mismatch"].items())[:8]))
    lines.append(f"load average: {before} before"
                 + (f", {loadavg_after} after" if loadavg_after is not None else "")
                 + (f" -- LOADED MACHINE (> {ncpu / 2:g} on {ncpu} CPUs): absolute numbers "
                    "are not comparable across runs" if busy else ""))
    return lines
