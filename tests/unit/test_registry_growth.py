"""A registry change costs the same with 1 or 1,000 agents (issue 22: creation slowed with each).

Every change used to deep-copy every agent and encode every agent again for
its durable save. Now a change copies only the record it touches (the others
are shared, never changed in place) and the store re-encodes only records it
has not written before; the file is still the bytes ``json.dumps(...,
indent=1, sort_keys=True)`` writes, saved whole, durably, before the swap.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from badged.identity import store as store_mod
from badged.identity.registry import AgentRegistry
from badged.identity.store import AgentStore
from badged.keystore.memory import MemoryKeyStore


def _registry(path: Path, ks: MemoryKeyStore) -> AgentRegistry:
    return AgentRegistry(store=AgentStore(path), keystore=ks, clock=lambda: 1_800_000_000.0,
                         trust_domain="example.org", max_token_ttl=600,
                         audit=lambda event: None)


def _reference(path: Path) -> bytes:
    """What the store wrote before fragments: one json.dumps of the whole document."""
    agents = AgentStore(path).load()
    doc: dict[str, Any] = {"schema": 1,
                           "agents": [asdict(a) for a in sorted(agents.values(),
                                                                key=lambda a: a.name)]}
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def test_the_file_is_byte_for_byte_what_one_dump_writes(tmp_path: Path) -> None:
    path = tmp_path / "agents.json"
    store = AgentStore(path)
    store.save({})
    assert path.read_bytes() == _reference(path)
    ks = MemoryKeyStore()
    reg = _registry(path, ks)
    reg.create("b-bot", "desc with \"quotes\", ünïcode and\nnewline")
    reg.create("a-bot")
    reg.ssh_keys = True
    reg.create("c-bot")
    reg.rotate("a-bot")
    reg.revoke("b-bot", "gone")
    reg.ensure_ssh_keys()
    assert path.read_bytes() == _reference(path)
    assert set(AgentStore(path).load()) == {"a-bot", "b-bot", "c-bot"}


def test_a_change_encodes_and_copies_only_the_agent_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ks = MemoryKeyStore()
    reg = _registry(tmp_path / "agents.json", ks)
    for i in range(30):
        reg.create(f"bot-{i:02d}")
    before = {r.name: r for r in reg.list(include_revoked=True)}
    encoded: list[str] = []
    real = asdict

    def counting(rec: Any) -> Any:
        encoded.append(rec.name)
        return real(rec)

    monkeypatch.setattr(store_mod, "asdict", counting)
    reg.create("new-bot")
    reg.rotate("bot-03")
    reg.revoke("bot-07")
    # One record encoded per change (the new or changed one), not 30 each time.
    assert encoded == ["new-bot", "bot-03", "bot-07"]
    after = {r.name: r for r in reg.list(include_revoked=True)}
    # Untouched records are the same objects; changed ones are new objects,
    # and the old objects were not changed in place (copy on write).
    assert all(after[n] is before[n] for n in before if n not in ("bot-03", "bot-07"))
    assert after["bot-03"] is not before["bot-03"] and before["bot-03"].current.version == 1
    assert after["bot-07"].status == "revoked" and before["bot-07"].status == "active"
    assert (tmp_path / "agents.json").read_bytes() == _reference(tmp_path / "agents.json")


def test_a_failed_save_leaves_the_old_file_and_the_next_save_is_whole(tmp_path: Path) -> None:
    """The fragment cache never lets a save write less than the whole registry."""
    path = tmp_path / "agents.json"
    ks = MemoryKeyStore()
    reg = _registry(path, ks)
    reg.create("one")
    good = path.read_bytes()
    path.unlink()
    path.mkdir()  # the rename target is a directory: the save fails
    with pytest.raises(Exception, match="nothing changed"):
        reg.create("two")
    path.rmdir()
    reg.create("three")  # a fresh file, from the cache, still holds every agent
    assert set(AgentStore(path).load()) == {"one", "three"}
    assert path.read_bytes() == _reference(path) != good
