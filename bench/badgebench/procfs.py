"""Reading CPU time, RSS and machine load from /proc (Linux only)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces.
    return text[text.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU of ``pid`` and its live descendants, plus reaped children."""
    total = 0
    for p in descendants(pid):
        fields = _stat_fields(p)
        if fields is None:
            continue
        # utime, stime, cutime, cstime are fields 14-17 (1-based) of stat.
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


@dataclass(frozen=True)
class MachineSample:
    busy_ticks: int
    total_ticks: int

    @staticmethod
    def now() -> MachineSample:
        first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        vals = [int(x) for x in first[:8]]  # user nice system idle iowait irq softirq steal
        idle = vals[3] + vals[4]
        return MachineSample(busy_ticks=sum(vals) - idle, total_ticks=sum(vals))

    def busy_cores_since(self, earlier: MachineSample, wall_s: float) -> float:
        return (self.busy_ticks - earlier.busy_ticks) / CLK_TCK / wall_s if wall_s > 0 else 0.0


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
