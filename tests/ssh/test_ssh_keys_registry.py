"""The ``ssh`` purpose key in the registry's change protocol (issue 19)."""

from __future__ import annotations

from pathlib import Path

import pytest

from badged.identity.registry import AgentRegistry, UnregisteredKeysError
from badged.identity.store import AgentStore
from badged.keystore.memory import MemoryKeyStore
from tests.unit.test_registry_state import Audit


def _registry(tmp_path: Path, ks: MemoryKeyStore, audit: Audit, *, ssh: bool) -> AgentRegistry:
    reg = AgentRegistry(store=AgentStore(tmp_path / "agents.json"), keystore=ks,
                        clock=lambda: 1_800_000_000.0, trust_domain="example.org",
                        max_token_ttl=600, audit=audit)
    reg.ssh_keys = ssh
    return reg


def test_existing_agent_gets_an_ssh_key_at_next_start_audited(tmp_path: Path) -> None:
    ks, audit = MemoryKeyStore(), Audit()
    _registry(tmp_path, ks, audit, ssh=False).create("bot")
    assert sorted(ks.list()) == ["badged/agent/bot/v1/sig", "badged/agent/bot/v1/tok"]
    # Next start with [ssh] on: reconcile finds nothing odd, then the key is added.
    reg = _registry(tmp_path, ks, audit, ssh=True)
    reg.reconcile(audit.find_op)
    assert reg.ssh_key("bot") is None
    assert reg.ensure_ssh_keys() == ["bot"]
    [op] = [r["op"] for r in audit.records if r["event"] == "agent.ssh-key.intent"]
    assert audit.events(op) == ["agent.ssh-key.intent", "key.created", "agent.ssh_key_added"]
    key = reg.ssh_key("bot")
    assert key is not None and key.handle.name == "badged/agent/bot/v1/ssh"
    assert reg.ensure_ssh_keys() == []  # once only
    # A third start: the ssh key is registered, not an orphan.
    again = _registry(tmp_path, ks, audit, ssh=True)
    report = again.reconcile(audit.find_op)
    assert not report.missing and not report.quarantined


def test_rotate_and_revoke_destroy_the_ssh_key_too(tmp_path: Path) -> None:
    ks, audit = MemoryKeyStore(), Audit()
    reg = _registry(tmp_path, ks, audit, ssh=True)
    reg.create("bot")
    assert "badged/agent/bot/v1/ssh" in ks.list()
    reg.rotate("bot")
    assert sorted(k for k in ks.list() if k.startswith("badged/agent/")) == [
        "badged/agent/bot/v2/sig", "badged/agent/bot/v2/ssh", "badged/agent/bot/v2/tok"]
    destroyed = {r["key"] for r in audit.records if r["event"] == "key.destroyed"}
    assert "badged/agent/bot/v1/ssh" in destroyed
    reg.revoke("bot", "done")
    assert not [k for k in ks.list() if k.startswith("badged/agent/")]


def test_unknown_ssh_key_in_the_token_refuses_start(tmp_path: Path) -> None:
    ks, audit = MemoryKeyStore(), Audit()
    _registry(tmp_path, ks, audit, ssh=False).create("bot")
    ks.generate("badged/agent/bot/v1/ssh")  # made out of band
    with pytest.raises(UnregisteredKeysError):
        _registry(tmp_path, ks, audit, ssh=True).reconcile(audit.find_op)
