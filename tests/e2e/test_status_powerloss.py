"""Issue 21 gap: a power loss must not leave live tokens unmarkable.

The status-list journal is fsynced once per block, not per token. A power
loss keeps only what was fsynced; this test leaves the journal exactly as
that would (the daemon killed with SIGKILL, the journal cut back to its last
fsynced length), restarts the daemon on the same state, revokes the agent,
and requires the token's bit set: start-up reconciled the token from its
durable ``token.issued`` audit record.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from badgeclient import AdminClient, WorkloadClient
from badgeclient.credentials import CredentialClient
from badgeclient.status import StatusListChecker, socket_fetcher
from badgeclient.verify import RevokedError
from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon, start_daemon
from tests.e2e.test_context_status import POLICY

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    out: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return out


def _device_jwks(d: RunningDaemon) -> dict[str, Any]:
    with CredentialClient(d.workload) as c:
        return {"keys": [c.trust_bundle().device_jwk]}


def test_power_loss_journal_cut_then_revocation_still_marks_the_token(
        softhsm_available: None) -> None:
    base = short_tmpdir("bpl")
    os.chmod(base, 0o755)
    state = base / "s"
    d = start_daemon(state)
    try:
        (d.state / "policy.toml").write_text(POLICY)
        with AdminClient(d.admin) as a:
            assert a.reload_policy() == (True, "")
        with WorkloadClient(d.workload) as w:
            tokens = [w.fetch_token(audience="demo", ttl_seconds=600).token for _ in range(3)]
        journal = next(Path(state).rglob("status/journal"))
        d.stop(signal.SIGKILL)  # journal lines may still be batched in memory: lost too
        # What a power loss leaves: the journal as of its last fsync (the block
        # reservation before the first of these tokens: empty on a fresh list).
        os.truncate(journal, 0)
        d = start_daemon(state)
        with AdminClient(d.admin) as a:
            a.revoke_agent("demo-agent", reason="power-loss test")
        checker = StatusListChecker(fetch=socket_fetcher(d.workload), keys=_device_jwks(d),
                                    max_age=0.01)
        time.sleep(0.02)
        for tok in tokens:
            with pytest.raises(RevokedError):
                checker.check(_claims(tok))
        assert "restored from the audit log" in d.log.read_text(errors="replace")
        records = [json.loads(line) for f in sorted((state / "audit").glob("*.jsonl"))
                   for line in f.read_text().splitlines() if line.strip()]
        assert [r["restored"] for r in records if r.get("event") == "status_list.reconciled"] == [3]
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
