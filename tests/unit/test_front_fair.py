"""Issue 16, fairness: a uid that matches no rule cannot take the event loop from bound callers.

Bytes and counts were bounded before; time was not. Each attack here is cheap
to send and dear to process, performed for real by another uid (``nobody``,
a child process that drops privileges before connecting) against a live front
on real sockets; a test fails if the attacker gets more loop time, or gets
its refusals faster, than the defence allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from badged.listener import front as front_mod
from badged.listener.budget import Budget, FrontLimits
from badged.listener.front import GrpcFront
from tests.unit.test_front_hostile import DATA, Raw, _frame, _msg, _run, until

NOBODY = 65534
HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


def _answered(sid: int, f: tuple[int, int, int, bytes]) -> bool:
    return f[0] == 1 and f[2] == sid and f[1] & 1 == 1


def _bound(uid: int) -> bool:
    return uid != NOBODY


async def _attack(public: Path, *args: str) -> dict[str, Any]:
    os.chmod(public.parent, 0o755)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "front_attacker.py"), str(NOBODY), str(public), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    return dict(json.loads(out))


def test_an_unbound_uid_gets_its_cpu_share_of_header_decoding_not_the_loop() -> None:
    """Header blocks that decode over the 16 KiB list limit, one per connection, reconnecting
    at once: cheap to send, each ~7 ms (16 KB) or ~26 ms (60 KB) of the daemon's loop to
    decode, while every bound call waits behind it. Unmetered, the loop decoded 94 of the
    60 KB ones in 2 s; metered, a 60 KB block is refused before decoding, and 16 KB ones are
    decoded at the uid's CPU share (4 % of a core: a few a second)."""
    seconds = 2.0

    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        served = 0
        stop = time.monotonic() + 2 * seconds

        async def bound_caller() -> None:
            nonlocal served
            link = await Raw.connect(public)
            sid = 1
            while time.monotonic() < stop:
                await link.send(link.request(sid) + _frame(DATA, 1, sid, _msg(b"hi")))
                await link.frames(partial(_answered, sid))
                served += 1
                sid += 2
                await asyncio.sleep(0.01)
            link.close()

        async def attacks() -> tuple[dict[str, Any], dict[str, Any]]:
            big = await _attack(public, "headers", str(seconds), "96000")
            return big, await _attack(public, "headers", str(seconds), "26000")

        (big, small), _ = await asyncio.gather(attacks(), bound_caller())
        state["big"], state["small"], state["served"] = big, small, served
        state["holds"] = front.holds

    state = _run(scenario, FrontLimits(), is_bound=_bound)
    big, small = state["big"], state["small"]
    assert big["decoded"] == 0 and set(big["reasons"]) == {"header block too large"}, big
    assert state["holds"] > 0, small
    assert 0 < small["decoded"] <= 25, small
    assert state["served"] > 40, "the bound caller was not served meanwhile"


def test_a_metered_uid_is_told_of_its_refusal_late_a_bound_one_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connection that reconnects at once makes the daemon accept, set up and tear
    down as fast as the client can loop (4 hostile uids: ~3,000 a second, most of a core
    between the attackers and the daemon). A metered uid's refusal is sent TARPIT_S late,
    unread meanwhile; a bound uid's at once."""
    monkeypatch.setattr(front_mod, "TARPIT_S", 0.6)
    budget = Budget(connections=2, streams=16, handlers=16, buffered=1 << 20)
    limits = FrontLimits(max_message=1024, conn_streams=4, conn_buffer=65535, bound=budget,
                         unbound=budget, body_timeout=5.0, sweep_interval=0.05)

    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        state["nobody"] = await _attack(public, "refused", "2")
        busy = []
        for _ in range(2):
            link = await Raw.connect(public)
            await link.send(link.request(1))  # a body is awaited: not idle
            busy.append(link)
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        late = await Raw.connect(public)
        state["root"] = (await late.goaway(), time.monotonic() - t0)
        for link in [*busy, late]:
            link.close()

    state = _run(scenario, limits, is_bound=_bound)
    nobody = state["nobody"]
    assert nobody["goaway"] and "per-uid connection limit" in nobody["goaway"][1], nobody
    assert nobody["waited"] >= 0.5, f"refused after {nobody['waited']:.2f}s: no tarpit"
    (_code, reason), waited = state["root"]
    assert b"per-uid connection limit" in reason and waited < 0.4, (reason, waited)


def test_a_metered_callers_calls_are_served_and_cancelled_like_anyone_elses() -> None:
    """Metering wraps a metered caller's handler to time each step: answers, resets and the
    slot accounting must be exactly as for a bound caller (here every uid is metered)."""
    async def scenario(front: GrpcFront, public: Path, state: dict[str, Any]) -> None:
        raw = await Raw.connect(public)
        await raw.send(raw.request(1) + _frame(DATA, 1, 1, _msg(b"hi"))
                       + raw.request(3, "/t.T/Stubborn") + _frame(DATA, 1, 3, _msg(b"s")))
        got = await raw.frames(partial(_answered, 1))
        assert raw.status(got, 1)[b"grpc-status"] == b"0"
        await until(lambda: state.get("stubborn_running") == 1, "the handler started")
        await raw.send(_frame(3, 0, 3, b"\0\0\0\x08"))  # RST_STREAM(CANCEL)
        await until(lambda: state["stubborn_running"] == 0, "the handler saw the cancel and ended")
        (conn,) = front.connections
        assert conn.meter is not None and not conn.streams, "slot leaked"
        assert conn.meter.tokens < front.limits.cpu_burst, "nothing was charged"
        raw.close()

    _run(scenario, is_bound=lambda uid: False)
