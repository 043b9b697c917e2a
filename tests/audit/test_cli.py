"""``badgectl audit``: exit codes and output, in-process and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from badgeclient._cli.audit import audit_group
from badged.keystore.port import KeyHandle
from tests.audit.helpers import build_log, find_line, log_lines, open_log, rewrite

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def log_dir(audit_dir: Path, mem_key: KeyHandle) -> Path:
    build_log(audit_dir, mem_key, n=12, every=5)
    return audit_dir


@pytest.fixture
def pubkey_pem(tmp_path: Path, mem_key: KeyHandle) -> Path:
    p = tmp_path / "device.pem"
    p.write_bytes(mem_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return p


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(audit_group, list(args), env=env)
    return result.exit_code, result.output


def test_verify_ok_with_and_without_key(log_dir: Path, pubkey_pem: Path) -> None:
    code, out = _run("verify", "--dir", str(log_dir), "--pubkey", str(pubkey_pem))
    assert code == 0, out
    assert "OK" in out and "signatures verified" in out
    code, out = _run("verify", "--dir", str(log_dir))
    assert code == 0 and "NOT checked" in out


def test_verify_failure_exits_1_and_names_the_record(log_dir: Path) -> None:
    path, idx = find_line(log_dir, 4)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[idx] = lines[idx].replace(b"token.issued", b"token.denied")
    rewrite(path, lines)
    code, out = _run("verify", "--dir", str(log_dir))
    assert code == 1
    assert f"{path.name}:4: seq 4" in out and "hash_mismatch" in out


def test_verify_json_report(log_dir: Path, pubkey_pem: Path) -> None:
    code, out = _run("verify", "--json", "--strict", "--dir", str(log_dir),
                     "--pubkey", str(pubkey_pem))
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] is True and doc["records"] == 15 and doc["unsealed"] == 0


def test_verify_from(log_dir: Path) -> None:
    code, out = _run("verify", "--from", "6", "--dir", str(log_dir))
    assert code == 0 and "seq 6..15" in out


def test_usage_errors_exit_2(log_dir: Path, tmp_path: Path) -> None:
    assert _run("verify", "--dir", str(tmp_path / "nope"))[0] == 2
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    assert _run("verify", "--dir", str(log_dir), "--pubkey", str(bad))[0] == 2
    assert _run("verify", "--dir", str(log_dir), "--pubkey", str(tmp_path / "none.pem"))[0] == 2
    assert _run("verify", "--dir", str(log_dir), "--from", "0")[0] == 2
    assert _run("frobnicate")[0] == 2


def test_dir_from_environment(log_dir: Path) -> None:
    code, out = _run("verify", env={"BADGED_AUDIT_DIR": str(log_dir)})
    assert code == 0 and "15 records" in out


def test_tail_filters_by_agent_and_prints_json(log_dir: Path) -> None:
    code, out = _run("tail", "--agent", "agent-1", "-n", "2", "--json", "--dir", str(log_dir))
    assert code == 0
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["agent"] for r in recs] == ["agent-1", "agent-1"]
    assert [r["jti"] for r in recs] == ["j7", "j10"]
    code, out = _run("tail", "-n", "3", "--dir", str(log_dir))
    assert code == 0 and len(out.splitlines()) == 3 and "audit.checkpoint" in out


def test_export_writes_stored_lines(log_dir: Path, tmp_path: Path) -> None:
    code, out = _run("export", "--dir", str(log_dir))
    assert code == 0
    stored = b"".join(b"".join(lines) for _p, lines in log_lines(log_dir))
    assert out.encode() == stored
    dest = tmp_path / "out.jsonl"
    code, _ = _run("export", "--from", "10", "--agent", "agent-0", "-o", str(dest),
                   "--dir", str(log_dir))
    assert code == 0
    recs = [json.loads(line) for line in dest.read_text().splitlines()]
    assert recs and all(r["agent"] == "agent-0" and r["seq"] >= 10 for r in recs)


# -- as a real process: the way an operator runs it --------------------------------

_CMD = "from badgeclient._cli.audit import audit_group; audit_group()"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "daemon"), str(ROOT / "clients")])
    return env


def test_verify_as_a_subprocess(log_dir: Path, pubkey_pem: Path) -> None:
    ok = subprocess.run([sys.executable, "-c", _CMD, "verify", "--dir", str(log_dir),
                         "--pubkey", str(pubkey_pem)],
                        capture_output=True, text=True, env=_env(), timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    path, idx = find_line(log_dir, 9)
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[idx]
    rewrite(path, lines)
    bad = subprocess.run([sys.executable, "-c", _CMD, "verify", "--dir", str(log_dir)],
                         capture_output=True, text=True, env=_env(), timeout=60, check=False)
    assert bad.returncode == 1
    assert "seq 10" in bad.stdout and "seq_gap" in bad.stdout
    assert "first bad record" in bad.stderr
    usage = subprocess.run([sys.executable, "-c", _CMD, "verify", "--dir", "/nonexistent/x"],
                           capture_output=True, text=True, env=_env(), timeout=60, check=False)
    assert usage.returncode == 2


def test_tail_follow_as_a_subprocess_sees_new_records(log_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CMD, "tail", "-n", "1", "--follow", "--json",
         "--poll-interval", "0.05", "--dir", str(log_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    assert proc.stdout is not None
    try:
        # The last existing record comes first: from then on it is following.
        assert json.loads(proc.stdout.readline())["seq"] == 15
        log = open_log(log_dir, rotate_bytes=600)  # rotate while it follows
        for i in range(6):
            log.append_sync({"event": "followed", "agent": "f", "i": i})
        log.close()
        got: list[int] = []
        deadline = time.monotonic() + 60  # guard against a hang, not a timing assertion
        while len(got) < 6 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            rec = json.loads(line)
            if rec["event"] == "followed":
                got.append(rec["i"])
        assert got == list(range(6))
    finally:
        proc.kill()
        proc.wait(timeout=30)
