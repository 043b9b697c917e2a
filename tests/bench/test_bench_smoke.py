"""Smoke run of bench/run so the benchmark never rots (no timing thresholds).

Runs the quick mode for in-process python-pkcs11, ssh-agent with the PKCS#11
provider and badged itself (started by the bench from this tree, through the
lean gRPC client and through badgeclient) for a fraction of a second per row,
and checks the JSON has those rows with positive numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("softhsm2-util", "ssh-agent", "ssh-add", "p11-kit", "openssl")


@pytest.mark.slow
@pytest.mark.softhsm
def test_quick_rows(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing and os.geteuid() != 0:  # as root, bench/run installs them itself
        if request.config.getoption("--require-backends"):
            pytest.fail(f"required tools missing: {missing}")
        pytest.skip(f"needs {missing} (apt-get install -y softhsm2 p11-kit openssh-client)")
    out = tmp_path / "result.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "run"), "--quick", "--only", "inprocess,ssh-agent,badged",
         "--duration", "0.2", "--clients", "1,2", "--ceiling-rounds", "1", "--no-plot",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ssh-agent + PKCS#11 sign" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["meta"]["mode"] == "quick"
    assert doc["meta"]["loadavg_before"] and doc["meta"]["loadavg_after"]
    rows = {(r["group"], r["clients"]): r for r in doc["rows"]}
    badged_rows = [(g, n) for g in ("badged-fetch", "badged-sign", "badgeclient-fetch",
                                    "badgeclient-sign") for n in (1, 2)]
    for key in [("inprocess", 1), ("inprocess", 2), ("ssh-agent", 1), ("ssh-agent", 2),
                *badged_rows]:
        assert key in rows, f"missing row {key}: {sorted(rows)}"
        row = rows[key]
        assert row["error"] is None, row["error"]
        load = row["load"]
        assert row["ops_per_s"] > 0
        assert load["ops"] > 0
        assert 0 < load["p50_us"] <= load["p99_us"]
        assert load["loadgen_cpu_cores"] > 0
        assert row["ratio_vs_inprocess"] > 0
        assert row["ratio_vs_ssh_agent"] > 0 or key[0] == "inprocess"
    assert rows[("ssh-agent", 1)]["load"]["server_cpu_cores"] > 0
    assert rows[("badged-fetch", 2)]["load"]["server_cpu_cores"] > 0
    assert doc["badged"]["start_warm_s"] > 0 and doc["badged"]["rss_after_kib"] > 0
    # The ceiling round: ssh-agent, one daemon, and two independent daemons
    # (the second on its own token, CPU summed over both).
    ceiling = doc["ceiling"]
    assert "error" not in ceiling, ceiling.get("error")
    runs = ceiling["rounds"][0]["runs"]
    assert set(runs) == {"ssh-agent", "FetchToken one", "FetchToken two", "Sign one", "Sign two"}
    for name, run in runs.items():
        assert run["ops_per_s"] > 0 and run["server_cpu_us_per_op"] > 0, (name, run)
    assert ceiling["median"]["fetch_two_vs_one"] > 0 and ceiling["median"]["sign_two_vs_ssh"] > 0
    assert "ceiling medians vs ssh-agent@2" in proc.stdout
    # The state dirs (token, PIN file) are removed at the end of the run,
    # the second daemon's too.
    m = re.search(r"state dir (\S+)", proc.stderr)
    assert m is not None, proc.stderr[-2000:]
    assert not Path(m.group(1)).exists()
    assert not Path(ceiling["second_state_dir"]).exists()
