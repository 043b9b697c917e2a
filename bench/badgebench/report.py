"""The results table (stdout), the JSON file and the PNG plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from badgebench.load import LoadResult


@dataclass
class Row:
    group: str           # openssl | crypto | inprocess | ssh-agent | p11-kit | badged-fetch | ...
    label: str           # what the row measures, as printed
    clients: int
    result: LoadResult | None = None
    ops_per_s: float | None = None   # set directly for rows without a load run (openssl speed)
    note: str = ""
    error: str | None = None
    ratio_vs_ssh_agent: float | None = None
    ratio_vs_inprocess: float | None = None

    @property
    def rate(self) -> float | None:
        if self.error:
            return None
        if self.result is not None:
            return self.result.median_slice_ops_per_s or self.result.ops_per_s
        return self.ops_per_s

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "group": self.group, "label": self.label, "clients": self.clients,
            "ops_per_s": _r(self.rate), "note": self.note, "error": self.error,
            "ratio_vs_ssh_agent": _r(self.ratio_vs_ssh_agent, 3),
            "ratio_vs_inprocess": _r(self.ratio_vs_inprocess, 3),
        }
        if self.result is not None:
            d["load"] = {k: (_r(v, 3) if isinstance(v, float) else v)
                         for k, v in asdict(self.result).items()}
        return d


@dataclass
class Report:
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    badged: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    paired: dict[str, Any] = field(default_factory=dict)
    ceiling: dict[str, Any] = field(default_factory=dict)
    durability: dict[str, Any] = field(default_factory=dict)
    scale: dict[str, Any] = field(default_factory=dict)
    ssh: dict[str, Any] = field(default_factory=dict)  # issue 19 (badgebench.ssh)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": [r.to_json() for r in self.rows],
                "badged": self.badged, "paired": self.paired, "ceiling": self.ceiling,
                "durability": self.durability, "scale": self.scale, "ssh": self.ssh,
                "targets": self.targets}


def _r(v: float | None, nd: int = 1) -> float | None:
    return None if v is None else round(v, nd)


def compute_ratios(rows: list[Row]) -> None:
    """Ratio to ssh-agent at the same (or nearest lower) client count, and to in-process at 1."""
    ssh = sorted(((r.clients, r.rate) for r in rows
                  if r.group == "ssh-agent" and r.rate), key=lambda t: t[0])
    inproc = next((r.rate for r in rows if r.group == "inprocess" and r.clients == 1 and r.rate),
                  None)
    for r in rows:
        rate = r.rate
        if not rate:
            continue
        base = [v for c, v in ssh if c <= r.clients]
        if base and base[-1]:
            r.ratio_vs_ssh_agent = rate / base[-1]
        if inproc:
            r.ratio_vs_inprocess = rate / inproc


def other_cpu(res: LoadResult | None) -> float | None:
    """CPU the machine spent outside the load generator and the server: noise."""
    if res is None or not res.machine_busy_cores:
        return None
    return max(0.0, res.machine_busy_cores - res.loadgen_cpu_cores - (res.server_cpu_cores or 0))


def noisy_rows(rows: list[Row], threshold: float = 0.25) -> list[Row]:
    return [r for r in rows if not r.error and (other_cpu(r.result) or 0.0) > threshold]


def short_error(text: str) -> str:
    """The first line of an error, for the table; the JSON keeps all of it."""
    return text.split(" | ")[0].split("\n")[0][:160]


def _fmt(v: float | None, nd: int = 0, suffix: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:,.{nd}f}{suffix}"


def format_table(rows: list[Row]) -> str:
    head = ("path", "clients", "ops/s", "p50 µs", "p99 µs", "x ssh-agent", "x in-proc",
            "loadgen CPU", "server CPU", "other CPU")
    lines: list[tuple[str, ...]] = [head]
    notes: list[str] = []
    for r in rows:
        if r.error:
            who = f" ({r.clients} client{'' if r.clients == 1 else 's'})" if r.clients else ""
            notes.append(f"{r.label}{who}: not available ({short_error(r.error)})")
            continue
        res = r.result
        lines.append((
            r.label, str(r.clients), _fmt(r.rate),
            _fmt(res.p50_us if res else None), _fmt(res.p99_us or None if res else None),
            _fmt(r.ratio_vs_ssh_agent, 2, "x"), _fmt(r.ratio_vs_inprocess, 2, "x"),
            _fmt(res.loadgen_cpu_cores if res else None, 2),
            _fmt(res.server_cpu_cores if res else None, 2),
            _fmt(other_cpu(res), 2),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:],
                                                                          strict=True)]
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out.extend(notes)
    return "\n".join(out)


def format_markdown(rows: list[Row]) -> str:
    out = ["| path | clients | ops/s | p50 µs | p99 µs | x ssh-agent | x in-process | "
           "load-gen CPU (cores) | server CPU (cores) | other CPU (cores) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.error:
            out.append(f"| {r.label} | {r.clients} | not available ({short_error(r.error)}) "
                       "| | | | | | | |")
            continue
        res = r.result
        out.append("| " + " | ".join([
            r.label, str(r.clients), _fmt(r.rate),
            _fmt(res.p50_us if res else None), _fmt(res.p99_us or None if res else None),
            _fmt(r.ratio_vs_ssh_agent, 2), _fmt(r.ratio_vs_inprocess, 2),
            _fmt(res.loadgen_cpu_cores if res else None, 2),
            _fmt(res.server_cpu_cores if res else None, 2),
            _fmt(other_cpu(res), 2)]) + " |")
    return "\n".join(out)


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")


_COLORS = {"openssl": "#999999", "crypto": "#bbbbbb", "inprocess": "#4c72b0",
           "ssh-agent": "#dd8452", "p11-kit": "#937860", "badged-fetch": "#55a868",
           "badged-sign": "#2a7a3a", "badgeclient-fetch": "#8fd19e",
           "badgeclient-sign": "#6fbf7f"}


def plot(report: Report, path: Path) -> str | None:
    """Write the PNG; return None, or why no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib not importable ({exc})"
    rows = [r for r in report.rows if r.rate]
    if not rows:
        return "no rows to plot"
    labels = [f"{r.label} ({r.clients} client{'' if r.clients == 1 else 's'})" for r in rows]
    colors = [_COLORS.get(r.group, "#666666") for r in rows]
    y = list(range(len(rows)))[::-1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.42 * len(rows) + 2.2), sharey=True)
    rates = [r.rate or 0.0 for r in rows]
    ax1.barh(y, rates, color=colors)
    ax1.set_xscale("log")
    ax1.set_xlabel("signatures or tokens per second (log scale; higher is better)")
    for yi, v in zip(y, rates, strict=True):
        ax1.text(v, yi, f" {v:,.0f}", va="center", fontsize=8)
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels, fontsize=9)
    ax1.set_xlim(right=max(rates) * 4)
    ssh = {r.clients: r.rate for r in rows if r.group == "ssh-agent" and r.rate}
    if ssh:  # the yardstick: ssh-agent at 16 clients (else the most measured)
        n = 16 if 16 in ssh else max(ssh)
        ax1.axvline(ssh[n] or 0.0, color=_COLORS["ssh-agent"], ls="--", lw=1,
                    label=f"ssh-agent, {n} client{'' if n == 1 else 's'}")
        ax1.legend(loc="lower right", fontsize=8)
    p50 = [r.result.p50_us if r.result else 0.0 for r in rows]
    p99 = [r.result.p99_us if r.result else 0.0 for r in rows]
    h = 0.38
    ax2.barh([v + h / 2 for v in y], p50, height=h, color=colors, label="p50")
    ax2.barh([v - h / 2 for v in y], p99, height=h, color=colors, alpha=0.45, label="p99")
    ax2.set_xscale("log")
    ax2.set_xlabel("latency per call, µs (log scale; p50 solid, p99 light; lower is better)")
    for yi, a, b in zip(y, p50, p99, strict=True):
        if a:
            ax2.text(b, yi - h / 2, f" p99 {b:,.0f}", va="center", fontsize=7)
            ax2.text(a, yi + h / 2, f" p50 {a:,.0f}", va="center", fontsize=7)
    if any(p99):
        ax2.set_xlim(left=max(1.0, min(v for v in p50 if v) / 2), right=max(p99) * 8)
    m = report.meta
    fig.suptitle(f"badged vs peers on one SoftHSM P-256 key — {m.get('timestamp', '')} "
                 f"({m.get('mode', '')} mode, {m.get('cpus', '?')} CPUs, load "
                 f"{m.get('loadavg_before', '')} → {m.get('loadavg_after', '')})", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(axis="x", which="both", alpha=0.25)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
