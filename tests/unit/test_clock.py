"""Wall clock for records, monotonic clock for countdowns (issue 15, item 5)."""

from __future__ import annotations

from pathlib import Path

from badged.core.clock import FixedClock, StepDetector, monotonic_clock
from badged.policy.grants import GrantStore


def test_step_detector_sees_steps_not_slew() -> None:
    wall, mono = FixedClock(1_000_000.0), FixedClock(50.0)
    det = StepDetector(wall, mono)
    for _ in range(10):  # 1 s apart, slewing 0.5 ms/s: never a step
        wall.advance(1.0005)
        mono.advance(1.0)
        assert det.check() is None
    wall.advance(-3600)
    assert det.check() == -3600
    assert det.check() is None  # reported once
    wall.advance(3601)
    mono.advance(1)
    assert det.check() == 3600


def test_monotonic_clock_advances() -> None:
    a = monotonic_clock()
    assert monotonic_clock() >= a


def test_grants_count_down_on_the_monotonic_clock(tmp_path: Path) -> None:
    wall, mono = FixedClock(1_000_000.0), FixedClock(50.0)
    store = GrantStore(tmp_path / "grants.json", wall, mono)
    g = store.add_grant(agent="a", bundle="b", duration=30, reason="r", granted_by="op")
    d = store.add_delegation(user="u", uid=1, agent="a", audiences=frozenset({"x"}),
                             scopes=frozenset(), duration=30, reason="r")
    assert g.expires_at == 1_000_030.0  # the record: wall time as granted

    wall.advance(-15)  # a step back does not lengthen the grant ...
    mono.advance(20)
    wall.advance(20)
    [view] = store.grants()
    assert view.active(wall()) and view.expires_at - wall() == 10
    assert store.delegations()[d.id].expires_at - wall() == 10
    mono.advance(10.5)
    wall.advance(10.5)
    assert not store.grants()[0].active(wall())  # 30.5 s after granting
    assert not store.delegations()[d.id].active(wall())

    g2 = store.add_grant(agent="a", bundle="b", duration=30, reason="r", granted_by="op")
    wall.advance(3600)  # ... and a step forward does not end one early
    [view2] = [x for x in store.grants() if x.id == g2.id]
    assert view2.active(wall()) and view2.expires_at - wall() == 30

    # The file keeps the records; a restart counts from the wall clock then.
    reloaded = GrantStore(tmp_path / "grants.json", wall, FixedClock(0.0))
    [rec] = [x for x in reloaded.grants() if x.id == g2.id]
    assert rec.expires_at - wall() == g2.expires_at - wall()
