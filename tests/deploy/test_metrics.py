"""Metrics a Prometheus server can scrape: parsed with the Prometheus client's
own parser, counting what the audit log says, over a socket only operators reach."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from badged.errors import ConfigError
from badged.metrics import MAX_AGENTS, Metrics, parse_listen, reason_class
from tests.conftest import require_or_skip, short_tmpdir
from tests.e2e.conftest import RunningDaemon, badgectl_cmd, start_daemon

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dev(request: pytest.FixtureRequest) -> Iterator[RunningDaemon]:
    if shutil.which("softhsm2-util") is None:
        require_or_skip(request.config, "softhsm2-util not installed")
    base = short_tmpdir("bdm")
    os.chmod(base, 0o755)
    d = start_daemon(base / "s", "--metrics")
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def _ctl(d: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(badgectl_cmd(*args), capture_output=True, text=True, timeout=60,
                          env=d.env(), check=False)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_count_what_the_audit_log_says(dev: RunningDaemon) -> None:
    assert _ctl(dev, "token", "--audience", "demo").returncode == 0
    assert _ctl(dev, "token", "--audience", "not-allowed").returncode == 1
    out = _ctl(dev, "metrics")  # over the admin socket
    assert out.returncode == 0, out.stderr
    s = _samples(out.stdout)
    http = _ctl(dev, "metrics", "--http", str(dev.state / "run" / "metrics.sock"))
    assert http.returncode == 0, http.stderr
    assert ("badged_keystore_up", frozenset()) in _samples(http.stdout)

    def value(name: str, **labels: str) -> float:
        return s[(name, frozenset(labels.items()))]

    assert value("badged_credentials_total", kind="token", agent="demo-agent",
                 decision="issued", reason="") >= 1
    assert value("badged_credentials_total", kind="token", agent="demo-agent",
                 decision="denied", reason="audience") >= 1
    assert value("badged_request_duration_seconds_count",
                 method="/badged.v1.WorkloadService/FetchToken") >= 2
    assert value("badged_audit_fsync_seconds_count") >= 1
    assert value("badged_keystore_up") == 1
    assert value("badged_audit_queue_depth") >= 0
    assert ("badged_connections", frozenset({("socket", "workload")})) in s
    as_json = _ctl(dev, "metrics", "--json")
    assert as_json.returncode == 0
    assert "badged_credentials" in {f["name"] for f in json.loads(as_json.stdout)}


def test_metrics_socket_is_for_operators_only(dev: RunningDaemon) -> None:
    sock = dev.state / "run" / "metrics.sock"
    assert os.stat(sock).st_mode & 0o777 == 0o600  # no operator_group in dev: like admin.sock
    if os.geteuid() != 0:
        return
    from tests.deploy.layout import user_env, user_python

    for p in (dev.state, dev.state / "run"):
        os.chmod(p, 0o755)
    for how in (("--http", str(sock)), ("--admin-socket", str(dev.admin))):
        proc = subprocess.run([user_python(), "-m", "badgeclient._cli.main", "metrics", *how,
                               "--json"], user=65534, group=65534, extra_groups=[],
                              capture_output=True, text=True, timeout=60, env=user_env(),
                              check=False, cwd="/")
        assert proc.returncode == 4, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["error"]["code"] == "permission_denied"


def test_metrics_are_off_unless_enabled(request: pytest.FixtureRequest) -> None:
    if shutil.which("softhsm2-util") is None:
        require_or_skip(request.config, "softhsm2-util not installed")
    base = short_tmpdir("bdn")
    os.chmod(base, 0o755)
    d = start_daemon(base / "s")
    try:
        off = _ctl(d, "metrics", "--json")
        assert off.returncode == 1
        assert json.loads(off.stdout)["error"]["code"] == "metrics_disabled"
        assert not (d.state / "run" / "metrics.sock").exists()
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_labels_stay_bounded() -> None:
    m = Metrics()
    batch = b"\n".join(json.dumps({"event": "token.denied", "decision": "deny",
                                   "agent": f"made-up-{i}", "reason": f"free text {i}",
                                   "request": {"kind": "token"}}).encode()
                       for i in range(MAX_AGENTS + 50))
    m.observe_audit(batch)
    fams = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    agents = {s.labels["agent"] for s in fams["badged_credentials"].samples}
    reasons = {s.labels["reason"] for s in fams["badged_credentials"].samples}
    assert len(agents) == MAX_AGENTS + 1 and "other" in agents
    assert reasons == {"other"}
    assert reason_class("bundle demo: audience 'x' not in bundle") == "audience"


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.0.2.1:80", "localhost", "rel/path.sock"])
def test_metrics_listen_is_local_only(listen: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(listen)
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)


def test_metrics_config_keys(tmp_path: Path) -> None:
    from badged.config import load_config

    cfg = tmp_path / "badged.toml"
    base = '[keystore]\nuri = "pkcs11:token=t?pin-source=file:/etc/pin"\n'
    cfg.write_text(base)
    off = load_config(cfg)
    assert not off.metrics_enabled and off.metrics_listen is None
    cfg.write_text(base + '[metrics]\nenabled = true\n')
    assert load_config(cfg).metrics_enabled
    cfg.write_text(base + '[metrics]\nlisten = "127.0.0.1:9464"\n')
    on = load_config(cfg)
    assert on.metrics_enabled and on.metrics_listen == "127.0.0.1:9464"
    cfg.write_text(base + '[metrics]\nenabled = "yes"\n')
    with pytest.raises(ConfigError):
        load_config(cfg)
