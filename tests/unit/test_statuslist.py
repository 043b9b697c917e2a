"""badged.statuslist and badged.core.context: bounds, durability, reuse (issue 21)."""

from __future__ import annotations

import base64
import gc
import tracemalloc
import zlib
from pathlib import Path

import pytest

from badged.core import context
from badged.errors import InvalidRequestError, RateLimitedError
from badged.policy.model import AgentRule, Bundle, Grant, Policy, Request, evaluate
from badged.statuslist import BLOCK, StatusList


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _bits(sl: StatusList) -> bytes:
    lst = sl.encoded()["lst"]
    return zlib.decompress(base64.urlsafe_b64decode(lst + "=" * (-len(lst) % 4)))


def test_revocation_survives_a_restart_and_allocation_never_repeats(tmp_path: Path) -> None:
    clock = FakeClock()
    sl = StatusList(tmp_path / "s", uri="u", clock=clock, size=2 * BLOCK)
    a = sl.allocate(exp=clock.now + 600, agent="bot", grant="g-1", delegation=None)
    b = sl.allocate(exp=clock.now + 600, agent="bot", grant=None, delegation="d-1")
    c = sl.allocate(exp=clock.now + 600, agent="other", grant=None, delegation=None)
    assert sl.revoke(grant="g-1") == 1 and sl.status(a) == 1 and sl.status(b) == 0
    sl.close()
    again = StatusList(tmp_path / "s", uri="u", clock=clock, size=2 * BLOCK)
    assert again.status(a) == 1  # the bit survived
    assert again.revoke(delegation="d-1") == 1 and again.status(b) == 1  # the journal did too
    assert again.status(c) == 0
    d = again.allocate(exp=clock.now + 600, agent="bot", grant=None, delegation=None)
    assert d == BLOCK  # resumes past the reserved block: nothing handed out twice
    assert _bits(again)[a // 8] >> (a % 8) & 1 == 1  # LSB-first, draft §4.1


def test_full_list_refuses_and_expired_indices_are_reused_clean(tmp_path: Path) -> None:
    clock = FakeClock()
    sl = StatusList(tmp_path / "s", uri="u", clock=clock, size=BLOCK)
    first = [sl.allocate(exp=clock.now + 60, agent="bot", grant=None, delegation=None)
             for _ in range(BLOCK)]
    assert len(set(first)) == BLOCK
    sl.revoke(agent="bot")
    with pytest.raises(RateLimitedError):  # never reuse an index a live token holds
        sl.allocate(exp=clock.now + 60, agent="bot", grant=None, delegation=None)
    clock.now += 200  # every token expired (plus skew)
    idx = sl.allocate(exp=clock.now + 60, agent="bot", grant=None, delegation=None)
    assert sl.status(idx) == 0  # the new holder starts VALID


@pytest.mark.parametrize("pairs,needle", [
    ({"channel": "#a", "task": "b", "session": "c", "on_behalf_of": "d", "extra": "e"},
     "at most"),
    ({"repo": "x"}, "unknown key"),
    ({"channel": "x" * 129}, "1-128"),
    ({"channel": "a b"}, "no spaces"),
    ({"channel": "\u00e9"}, "printable ASCII"),
])
def test_context_bounds(pairs: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        context.parse(pairs)
    assert needle in exc.value.caller_message


def test_context_scoped_grant_only_in_its_context() -> None:
    base = Bundle("base", frozenset({"a"}), frozenset(), frozenset({"token"}), 300)
    extra = Bundle("extra", frozenset({"b"}), frozenset(), frozenset({"token"}), 300)
    policy = Policy(agents=(AgentRule("bot", frozenset({"unix:uid:1"}), ("base",), "p:1"),),
                    bundles={"base": base, "extra": extra})
    grant = Grant("g-1", "bot", "extra", 0, 10**10, "r", "op",
                  context=(("channel", "#deploy"),))

    def decide(ctx: context.Context) -> bool:
        return evaluate(policy, {"unix:uid:1"}, Request("token", None, "b", context=ctx),
                        now=100, default_ttl=60, grants=[grant]).allowed

    assert decide((("channel", "#deploy"),))
    assert decide((("channel", "#deploy"), ("task", "T-1")))
    assert not decide((("channel", "#random"),))
    assert not decide(())


def test_start_up_reconciles_only_since_the_journals_last_fsync(tmp_path: Path) -> None:
    """The audit read after a power loss is bounded: from the last journal fsync
    (a block reservation), never older than max_ttl; entries it names that the
    journal lost are markable again."""
    from badged.statuslist import Issued

    clock = FakeClock()
    sl = StatusList(tmp_path / "s", uri="u", clock=clock, size=2 * BLOCK)
    reserved_at = clock.now
    a = sl.allocate(exp=clock.now + 600, agent="bot", grant=None, delegation=None)
    sl.close()
    (tmp_path / "s" / "journal").write_bytes(b"")  # the power loss
    clock.now += 100
    asked: list[float] = []

    def since(t: float) -> list[Issued]:
        asked.append(t)
        return [Issued(a, reserved_at + 600, "bot", None, None),
                Issued(a + 1, reserved_at - 9999, "bot", None, None)]  # long expired

    again = StatusList(tmp_path / "s", uri="u", clock=clock, size=2 * BLOCK,
                       issued_since=since, max_ttl=3600)
    assert asked and reserved_at - 120 <= asked[0] <= reserved_at
    assert again.reconciled == 1
    assert again.revoke(agent="bot") == 1 and again.status(a) == 1


def test_expired_holders_are_forgotten_and_the_journal_stays_the_live_size(
        tmp_path: Path) -> None:
    """Issuing for hours must not keep every token ever issued (memory, journal, revoke's
    scan): expired holders leave once per block, and the journal is compacted."""
    clock = FakeClock()
    sl = StatusList(tmp_path / "s", uri="u", clock=clock, size=64 * BLOCK)
    journal = tmp_path / "s" / "journal"
    revoked = sl.allocate(exp=clock.now + 60, agent="gone", grant=None, delegation=None)
    assert sl.revoke(agent="gone") == 1
    for _ in range(8):  # 8 blocks of tokens, each block expired before the next
        for _ in range(BLOCK):
            sl.allocate(exp=clock.now + 60, agent="bot", grant=None, delegation=None)
        clock.now += 200
    live = sl.allocate(exp=clock.now + 600, agent="bot", grant="g-1", delegation=None)
    # Holders are kept by chunk of BLOCK indices: the last chunk of round 7/8 and the one
    # holding `live` (was 8 * BLOCK + 2 before expired holders were pruned).
    assert sl.held <= 2 * BLOCK
    assert len(journal.read_bytes().splitlines()) <= 3 * BLOCK  # compacted, not 8 blocks
    assert sl.status(revoked) == 0  # expired: its bit is cleared, as reuse would
    assert sl.revoke(grant="g-1") == 1 and sl.status(live) == 1  # the live one still marks
    sl.close()
    again = StatusList(tmp_path / "s", uri="u", clock=clock, size=64 * BLOCK)
    assert again.status(live) == 1


def test_a_live_token_costs_tens_of_bytes_not_hundreds(tmp_path: Path) -> None:
    """Issue 16: the daemon's RSS grew with every token served and stayed up, since
    each live token held a dict entry, a NamedTuple, a float, an int and a heap
    tuple (~250 bytes, measured). Parallel columns cost ~32 bytes a token."""
    clock = FakeClock()
    sl = StatusList(tmp_path / "s", uri="u", clock=clock)
    agent, grant = "bot", "g-1"
    for _ in range(BLOCK + 1):  # the first block's structures are not per token
        sl.allocate(exp=clock.now + 300, agent=agent, grant=None, delegation=None)
    n = 8 * BLOCK
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            sl.allocate(exp=clock.now + 300 + i % 7, agent=agent,
                        grant=grant if i % 2 else None, delegation=None)
        gc.collect()
        per_token = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert per_token < 64, per_token  # was ~250
    assert sl.revoke(grant=grant) == n // 2
    sl.close()


def test_journal_lines_are_batched_and_a_crash_loses_none_of_the_tokens(tmp_path: Path) -> None:
    """Lines wait in memory (one write per batch, not per token); a crash before they
    are written loses them, and start-up puts their tokens back from the audit log."""
    from badged.statuslist import JOURNAL_BATCH, Issued

    clock = FakeClock()
    journal = tmp_path / "s" / "journal"
    sl = StatusList(tmp_path / "s", uri="u", clock=clock, size=2 * BLOCK)
    first = [sl.allocate(exp=clock.now + 600, agent="bot", grant=None, delegation=None)
             for _ in range(JOURNAL_BATCH)]
    assert len(journal.read_bytes().splitlines()) == JOURNAL_BATCH  # one full batch written
    late = [sl.allocate(exp=clock.now + 600, agent="bot", grant=None, delegation=None)
            for _ in range(3)]
    assert len(journal.read_bytes().splitlines()) == JOURNAL_BATCH  # still in memory
    # The crash: the object is dropped unflushed. Their token.issued records are durable.
    issued = [Issued(i, clock.now + 600, "bot", None, None) for i in first + late]
    again = StatusList(tmp_path / "s", uri="u", clock=clock, size=2 * BLOCK,
                       issued_since=lambda _t: issued, max_ttl=3600)
    assert again.reconciled == 3
    assert again.revoke(agent="bot") == JOURNAL_BATCH + 3
    assert all(again.status(i) == 1 for i in late)


def test_a_clean_stop_writes_the_waiting_lines(tmp_path: Path) -> None:
    clock = FakeClock()
    sl = StatusList(tmp_path / "s", uri="u", clock=clock, size=2 * BLOCK)
    idx = sl.allocate(exp=clock.now + 600, agent="bot", grant=None, delegation=None)
    sl.flush()
    assert (tmp_path / "s" / "journal").read_bytes().split()[0] == str(idx).encode()
    again = StatusList(tmp_path / "s", uri="u", clock=clock, size=2 * BLOCK,
                       issued_since=lambda _t: [], max_ttl=3600)
    assert again.reconciled == 0 and again.revoke(agent="bot") == 1
