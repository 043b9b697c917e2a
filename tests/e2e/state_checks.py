"""Invariants of token, registry and audit log after a restart (issue 15).

Shared by the kill -9 loop (tests/e2e/test_kill_loop.py) and the real-daemon
kill test (tests/e2e/test_state_safety.py); read the files, never the daemon.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from badged.audit.reader import iter_records
from badged.core.jose import jwk_thumbprint, public_key_from_jwk


def _b64(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def check_restart_invariants(state_dir: Path, snap: dict[str, Any]) -> None:
    reg_path = state_dir / "private" / "agents.json"
    agents = json.loads(reg_path.read_text())["agents"] if reg_path.exists() else []
    labels: list[str] = snap["labels"]
    kids: dict[str, str] = snap["kids"]
    wanted: dict[str, str] = {}
    for a in agents:
        if a["status"] == "active":
            cur = [v for v in a["versions"] if v["state"] == "active"][-1]
            wanted[cur["token_key"]] = cur["token_kid"]
            wanted[cur["sign_key"]] = cur["sign_kid"]
            if cur.get("ssh_key"):  # the SSH purpose key (badged dev turns [ssh] on)
                wanted[cur["ssh_key"]] = jwk_thumbprint(cur["ssh_jwk"])
    in_token = {k for k in labels if k.startswith("badged/agent/")}
    assert in_token == set(wanted), (sorted(in_token ^ set(wanted)), "token vs registry")
    for k in labels:
        # '' : SoftHSM creates a key object first and writes its attributes
        # after, so a SIGKILL inside C_GenerateKeyPair can leave a half-made object
        # without a label; badged finds keys by label only, so it is never used.
        assert k.startswith(("badged/agent/", "badged/quarantine/")) or k in (
            "badged/device/v1", ""), k
    for k, kid in wanted.items():
        if kids:
            assert kids[k] == kid, f"{k}: token key is not the one the registry names"

    recs = list(iter_records(state_dir / "audit"))
    commits = {r["kid"]: r for r in recs if r["event"] in ("agent.created", "agent.rotated")
               or (r["event"] == "registry.recovered" and r["outcome"] == "applied"
                   and r.get("kid"))}
    for a in agents:
        for v in a["versions"]:
            rec = commits.get(v["token_kid"])
            assert rec is not None and rec["agent"] == a["name"], (
                f"{a['name']} v{v['version']}: registry change without its audit record")
        if a["status"] == "revoked":
            assert any(r.get("agent") == a["name"] and (
                r["event"] == "agent.revoked" or (r["event"] == "registry.recovered"
                                                  and r["change"] == "revoke"
                                                  and r["outcome"] == "applied"))
                       for r in recs), f"{a['name']}: revoked without an audit record"
    intents = {r["op"] for r in recs if str(r["event"]).endswith(".intent")}
    terminal = {r.get("op") for r in recs
                if r["event"] in ("agent.created", "agent.rotated", "agent.revoked",
                                  "registry.recovered") or str(r["event"]).endswith(".aborted")}
    assert intents <= terminal, f"intent without completion or recovery: {intents - terminal}"
    seen_kids = {r.get("kid") for r in recs if r["event"] in ("key.created", "key.quarantined")}
    for k, kid in kids.items():  # (kids: when the caller could read them from the token)
        assert kid in seen_kids, f"{k} is in the token but its creation was never audited"


def check_tokens(state_dir: Path, tokens: list[str]) -> int:
    agents = json.loads((state_dir / "private" / "agents.json").read_text())["agents"]
    jwks = {v["token_kid"]: v["token_jwk"] for a in agents for v in a["versions"]}
    recs = list(iter_records(state_dir / "audit"))
    issued = {r["jti"]: r["seq"] for r in recs if r["event"] == "token.issued"}
    commit_seq = {r["kid"]: r["seq"] for r in recs
                  if r["event"] in ("agent.created", "agent.rotated", "registry.recovered")
                  and r.get("kid")}
    for tok in tokens:
        h, p, s = tok.split(".")
        header, payload = json.loads(_b64(h)), json.loads(_b64(p))
        kid, jti = header["kid"], payload["jti"]
        assert kid in jwks, f"token {jti} signed by a key the registry never held"
        sig = _b64(s)
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        pub = public_key_from_jwk(jwks[kid])
        pub.verify(der, f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA256()))
        assert jti in issued, f"token {jti} verifies but was never audited"
        assert commit_seq[kid] < issued[jti], f"token {jti} signed before its key was audited"
    return len(tokens)
