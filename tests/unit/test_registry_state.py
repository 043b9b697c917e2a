"""The registry's change protocol when its own steps fail (issue 15, item 2).

Real files in a temp dir, a real (in-memory) key store, and an audit sink
that can be made to fail at a chosen record: what the e2e tests cannot reach
without breaking the disk in two places at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from badged.errors import AuditError, FailedPreconditionError, StateError
from badged.identity.registry import (
    AgentRegistry,
    UnregisteredKeysError,
    parse_key_name,
    quarantine_name,
)
from badged.identity.store import AgentStore
from badged.keystore.memory import MemoryKeyStore


class Audit:
    """Collects records; raises AuditError for the event named in ``fail``."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.fail: str | None = None

    def __call__(self, event: Mapping[str, Any]) -> None:
        if event.get("event") == self.fail:
            raise AuditError(f"cannot write {self.fail}")
        self.records.append(dict(event))

    def events(self, op: str | None = None) -> list[str]:
        return [r["event"] for r in self.records if op is None or r.get("op") == op]

    def find_op(self, op: str) -> set[str]:
        return {r["event"] for r in self.records if r.get("op") == op}


def _registry(tmp_path: Path, ks: MemoryKeyStore, audit: Audit) -> AgentRegistry:
    return AgentRegistry(store=AgentStore(tmp_path / "agents.json"), keystore=ks,
                         clock=lambda: 1_800_000_000.0, trust_domain="example.org",
                         max_token_ttl=600, audit=audit)


def test_save_failure_destroys_new_keys_and_changes_nothing(tmp_path: Path) -> None:
    ks, audit = MemoryKeyStore(), Audit()
    reg = _registry(tmp_path, ks, audit)
    reg.create("bot")
    before_file = (tmp_path / "agents.json").read_bytes()
    keys_before = list(ks.list())
    # The rename target is a directory: the save fails after the keys were made.
    (tmp_path / "agents.json").unlink()
    (tmp_path / "agents.json").mkdir()
    with pytest.raises(StateError, match="nothing changed"):
        reg.rotate("bot")
    assert reg.get("bot").current.version == 1
    assert list(ks.list()) == keys_before
    [op] = [r["op"] for r in audit.records if r["event"] == "agent.rotate.intent"]
    assert audit.events(op) == ["agent.rotate.intent", "key.created", "key.created",
                                "agent.rotate.aborted", "key.destroyed", "key.destroyed"]
    assert not (tmp_path / "agents.pending.json").exists()
    (tmp_path / "agents.json").rmdir()
    (tmp_path / "agents.json").write_bytes(before_file)
    assert reg.rotate("bot").current.version == 2  # works again once it can be saved


def test_unaudited_completion_never_takes_effect_and_restart_undoes_it(tmp_path: Path) -> None:
    ks, audit = MemoryKeyStore(), Audit()
    reg = _registry(tmp_path, ks, audit)
    reg.create("bot")
    kid = reg.get("bot").current.token_kid
    audit.fail = "agent.rotated"
    with pytest.raises(AuditError):
        reg.rotate("bot")
    # Not in memory (still signs with v1), and the registry file was put back.
    assert reg.token_key("bot").kid == kid
    assert '"version": 2' not in (tmp_path / "agents.json").read_text()
    # Nothing more changes until a restart resolves it.
    audit.fail = None
    with pytest.raises(FailedPreconditionError, match="restart"):
        reg.create("other")
    # The restart: v2's keys are in the token but not in the registry.
    reg2 = _registry(tmp_path, ks, audit)
    report = reg2.reconcile(audit.find_op)
    assert sorted(report.quarantined) == ["badged/agent/bot/v2/sig", "badged/agent/bot/v2/tok"]
    [rec] = [r for r in audit.records if r["event"] == "registry.recovered"]
    assert rec["outcome"] == "not-applied" and rec["change"] == "rotate"
    assert reg2.token_key("bot").kid == kid
    assert not [k for k in ks.list() if k.startswith("badged/agent/bot/v2")]


def test_restart_after_commit_finishes_the_change(tmp_path: Path) -> None:
    """Saved but the completion record never written (process died): the
    registry file is the commit point, so restart records it as applied and
    destroys the retired keys, audited."""
    ks, audit = MemoryKeyStore(), Audit()
    reg = _registry(tmp_path, ks, audit)
    reg.create("bot")
    store = AgentStore(tmp_path / "agents.json")

    class Died(BaseException):
        pass

    def die(event: Mapping[str, Any]) -> None:
        if event.get("event") == "agent.rotated":
            raise Died
        audit(event)

    reg.set_audit(die)
    real_save = store.save
    saves: list[int] = []

    def save_then_die(agents: Any) -> None:
        saves.append(1)
        if len(saves) > 1:
            raise Died  # the process is gone: the old file is not put back
        real_save(agents)

    reg._store.save = save_then_die  # type: ignore[method-assign]
    with pytest.raises(Died):
        reg.rotate("bot")
    reg2 = _registry(tmp_path, ks, audit)
    assert reg2.get("bot").current.version == 2
    report = reg2.reconcile(audit.find_op)
    [rec] = [r for r in audit.records if r["event"] == "registry.recovered"]
    assert rec["outcome"] == "applied" and rec["kid"] == reg2.get("bot").current.token_kid
    assert sorted(report.destroyed) == ["badged/agent/bot/v1/sig", "badged/agent/bot/v1/tok"]
    assert sorted(k for k in ks.list() if k.startswith("badged/agent/")) == [
        "badged/agent/bot/v2/sig", "badged/agent/bot/v2/tok"]


def test_unregistered_keys_refuse_before_anything_changes(tmp_path: Path) -> None:
    ks, audit = MemoryKeyStore(), Audit()
    reg = _registry(tmp_path, ks, audit)
    reg.create("bot")
    reg.rotate("bot")
    (tmp_path / "agents.json").unlink()
    n = len(audit.records)
    with pytest.raises(UnregisteredKeysError) as info:
        _registry(tmp_path, ks, audit).reconcile(audit.find_op)
    assert str(info.value).startswith("key store: 2 keys have no registry entry (")
    assert len(audit.records) == n and len(ks.list()) == 2


def test_key_names_and_quarantine_names() -> None:
    assert parse_key_name("badged/agent/deploy-bot/v12/tok") == ("deploy-bot", 12, "tok")
    assert parse_key_name("badged/agent/x/v0/tok") is None
    assert parse_key_name("badged/device/v1") is None
    name = "badged/agent/bot/v1/tok"
    assert quarantine_name(name, []) == "badged/quarantine/agent/bot/v1/tok"
    assert quarantine_name(name, ["badged/quarantine/agent/bot/v1/tok"]) == \
        "badged/quarantine/agent/bot/v1/tok.2"
    long = f"badged/agent/{'a' * 63}/v12345/sig"  # 98 chars in quarantine
    q = quarantine_name(long, [])
    assert q.startswith("badged/quarantine/k-") and len(q) <= 96


@pytest.mark.parametrize("completed", [False, True])
def test_adopt_into_a_lost_registry_prefers_the_audited_version(tmp_path: Path,
                                                                 completed: bool) -> None:
    """A rotate was in flight (v2 made) when the registry was lost: adoption takes
    v2 only if the audit log says the rotate completed, else v1 (and sets v2 aside)."""
    ks, audit = MemoryKeyStore(), Audit()
    reg = _registry(tmp_path, ks, audit)
    reg.create("bot")
    v1_kid = reg.get("bot").current.token_kid

    class Died(BaseException):
        pass

    def die(event: Mapping[str, Any]) -> None:
        audit(event)
        if event.get("event") == "agent.rotated":
            raise Died  # after its completion record

    def save_dies(agents: Any) -> None:
        raise Died  # before the commit point

    if completed:
        reg.set_audit(die)
    else:
        reg._store.save = save_dies  # type: ignore[method-assign]
    with pytest.raises(Died):
        reg.rotate("bot")
    if completed:  # the retired v1 keys were not destroyed yet: the crash came first
        assert "badged/agent/bot/v1/tok" in ks.list()
    (tmp_path / "agents.json").unlink()
    reg2 = _registry(tmp_path, ks, audit)
    history = [r for r in audit.records if str(r["event"]).startswith("agent.")]
    report = reg2.reconcile(audit.find_op, orphans="adopt", history=history)
    rec = reg2.get("bot")
    assert rec.current.version == (2 if completed else 1)
    if not completed:
        assert rec.current.token_kid == v1_kid
    assert sorted(report.quarantined) == ([f"badged/agent/bot/v{1 if completed else 2}/{r}"
                                           for r in ("sig", "tok")])
    [adopted] = [r for r in audit.records if r["event"] == "agent.adopted"]
    assert adopted["audit_match"] is True
