"""A wall-clock step must not unpublish keys whose tokens are still live (issue 15 item 5).

Retired agent token keys (``publish_until``) and session keys (``exp``) used
to leave the JWKS when the daemon's *wall* clock passed their window: a step
forward by an hour unpublished them at once, and a relying party with a
correct clock refused live tokens. Each test here steps the injected wall
clock while the injected monotonic clock (real elapsed time) stands still,
and checks the JWKS from the relying party's side (its clock is the real one,
i.e. the monotonic one here). Each fails on the wall-clock-only code.
"""

from __future__ import annotations

from pathlib import Path

from badgeclient.session_verify import verify_session_chain
from badgeclient.verify import Verifier
from badged.core import session_keys as sk
from badged.core.clock import FixedClock
from badged.core.tokens import build_claims, mint_token
from badged.identity.registry import PUBLISH_LEEWAY, AgentRegistry, SigningKey
from badged.identity.session import SessionKeyManager
from badged.identity.store import AgentStore
from badged.keystore.memory import MemoryKeyStore

T0 = 1_800_000_000
ISS = "spiffe://example.org/badged"
TTL = 600
SCHED = sk.Schedule(period=300, max_ttl=TTL, leeway=30)
HOUR = 3600


class Clocks:
    """The daemon's wall clock (steps) and the real time that passes (monotonic).

    ``real()`` is what a relying party with a correct clock reads.
    """

    def __init__(self) -> None:
        self.wall = FixedClock(T0)
        self.mono = FixedClock(1000.0)

    def elapse(self, seconds: float) -> None:
        self.wall.advance(seconds)
        self.mono.advance(seconds)

    def real(self) -> float:
        return T0 + (self.mono() - 1000.0)


def _registry(tmp_path: Path, c: Clocks, ks: MemoryKeyStore) -> AgentRegistry:
    return AgentRegistry(store=AgentStore(tmp_path / "agents.json"), keystore=ks, clock=c.wall,
                         monotonic=c.mono, trust_domain="example.org", max_token_ttl=TTL)


def _mint(key: SigningKey, now: float) -> str:
    claims = build_claims(issuer=ISS, subject=key.spiffe_id, audience="demo", scopes=["read"],
                          ttl_seconds=TTL, now=now, jti=f"j{now}")
    return mint_token(claims=claims, key=key.handle, key_id=key.kid).token


def _kids(jwks: dict[str, list[dict[str, str]]]) -> set[str]:
    return {k["kid"] for k in jwks["keys"]}


def test_forward_step_keeps_a_retired_agent_key_published(tmp_path: Path) -> None:
    c, ks = Clocks(), MemoryKeyStore()
    reg = _registry(tmp_path, c, ks)
    reg.create("bot")
    old = reg.token_key("bot")
    token = _mint(old, c.wall())  # lives until T0 + TTL
    reg.rotate("bot")
    window = TTL + PUBLISH_LEEWAY
    c.wall.advance(HOUR)  # the daemon's clock jumps; no real time passes
    assert old.kid in _kids(reg.jwks())
    Verifier(jwks=reg.jwks(), clock=c.real, issuer=ISS).verify_token(token, audience="demo")
    c.mono.advance(window - 1)
    assert old.kid in _kids(reg.jwks())
    c.mono.advance(1)  # both deadlines passed: unpublished
    assert old.kid not in _kids(reg.jwks())
    assert reg.get("bot").current.token_kid in _kids(reg.jwks())


def test_backward_step_keeps_it_at_most_the_step_longer(tmp_path: Path) -> None:
    c, ks = Clocks(), MemoryKeyStore()
    reg = _registry(tmp_path, c, ks)
    reg.create("bot")
    old = reg.token_key("bot")
    reg.rotate("bot")
    c.wall.advance(-60)
    c.elapse(TTL + PUBLISH_LEEWAY)  # the monotonic deadline passes, the wall one not yet
    assert old.kid in _kids(reg.jwks())
    c.elapse(60)
    assert old.kid not in _kids(reg.jwks())


def test_restart_places_the_remaining_window_on_the_monotonic_clock(tmp_path: Path) -> None:
    c, ks = Clocks(), MemoryKeyStore()
    reg = _registry(tmp_path, c, ks)
    reg.create("bot")
    old = reg.token_key("bot")
    reg.rotate("bot")
    c.elapse(100)
    # Restart: only the recorded wall time carries over (remaining TTL + leeway - 100 s).
    reg2 = _registry(tmp_path, c, ks)
    c.wall.advance(HOUR)
    assert old.kid in _kids(reg2.jwks())
    c.mono.advance(TTL + PUBLISH_LEEWAY - 100)
    assert old.kid not in _kids(reg2.jwks())


def test_forward_step_keeps_a_session_key_published_and_the_sweep_counts_on_monotonic(
        tmp_path: Path) -> None:
    c, ks = Clocks(), MemoryKeyStore()
    reg = _registry(tmp_path, c, ks)
    reg.create("bot")
    timers: list[float] = []
    mgr = SessionKeyManager(reg, clock=c.wall, monotonic=c.mono, issuer=ISS, schedule=SCHED,
                            persist_path=tmp_path / "session-keys.json",
                            scheduler=lambda delay, fn: timers.append(delay))
    k1 = mgr.token_key("bot")
    assert timers == [SCHED.period]  # the sweep at use_until
    token = _mint(k1, c.wall())
    c.elapse(10)
    # A restart before the step: the remaining window goes on the monotonic clock at load.
    mgr2 = SessionKeyManager(reg, clock=c.wall, monotonic=c.mono, issuer=ISS, schedule=SCHED,
                             persist_path=tmp_path / "session-keys.json")
    c.wall.advance(HOUR)
    mgr.sweep()  # what the daemon does when it sees the step
    assert mgr.active_private_keys() == 0  # use_until is a claim: signing stops early
    for m in (mgr, mgr2):
        assert k1.kid in _kids(m.jwks())
        assert verify_session_chain(token, m.jwks(), now=c.real()).agent == reg.spiffe_id("bot")
    c.mono.advance(SCHED.expires_at(T0) - T0 - 11)
    assert k1.kid in _kids(mgr.jwks()) and k1.kid in _kids(mgr2.jwks())
    c.mono.advance(1)
    assert k1.kid not in _kids(mgr.jwks()) and k1.kid not in _kids(mgr2.jwks())


def test_backward_step_cannot_stretch_a_session_key_past_its_period(tmp_path: Path) -> None:
    c, ks = Clocks(), MemoryKeyStore()
    reg = _registry(tmp_path, c, ks)
    reg.create("bot")
    timers: list[float] = []
    mgr = SessionKeyManager(reg, clock=c.wall, monotonic=c.mono, issuer=ISS, schedule=SCHED,
                            scheduler=lambda delay, fn: timers.append(delay))
    mgr.token_key("bot")
    c.wall.advance(-HOUR)
    mgr.sweep()
    assert mgr.active_private_keys() == 1 and timers[-1] == SCHED.period  # not re-armed early
    c.mono.advance(SCHED.period)  # the timer fires at use_until in real time
    mgr.sweep()
    assert mgr.active_private_keys() == 0
