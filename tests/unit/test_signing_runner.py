"""SigningRunner: inline below the load threshold, gathered and back to back above it."""

from __future__ import annotations

import asyncio

import pytest

from badged.service.deps import BATCH_MIN_IN_FLIGHT, SigningRunner


def _noted(log: list[str], entry: str, result: str) -> str:
    """Records that a signature was made, then returns it (what the signer would)."""
    log.append(entry)
    return result


def _runner(in_flight: int) -> tuple[SigningRunner, list[str]]:
    runner = SigningRunner(off_loop=False)
    runner.in_flight = lambda: in_flight
    return runner, []


def test_below_the_threshold_a_signature_is_made_at_once() -> None:
    runner, log = _runner(BATCH_MIN_IN_FLIGHT - 1)

    async def main() -> None:
        coro = runner.run(lambda: _noted(log, "signed", "sig"))
        task = asyncio.ensure_future(coro)
        await asyncio.sleep(0)  # one step of the task: inline means done by now
        assert log == ["signed"] and task.done() and task.result() == "sig"

    asyncio.run(main())


def test_under_load_signatures_are_gathered_and_made_back_to_back() -> None:
    runner, log = _runner(BATCH_MIN_IN_FLIGHT)

    async def call(i: int) -> str:
        log.append(f"ask {i}")
        result = await runner.run(lambda: _noted(log, f"sign {i}", f"sig {i}"))
        log.append(f"got {i}")
        return result

    async def main() -> list[str]:
        return list(await asyncio.gather(*(call(i) for i in range(3))))

    assert asyncio.run(main()) == ["sig 0", "sig 1", "sig 2"]
    # Every caller asked before any signature was made: they ran back to back.
    assert log[:6] == ["ask 0", "ask 1", "ask 2", "sign 0", "sign 1", "sign 2"]


def test_a_failure_goes_to_its_own_caller_and_cancelled_callers_get_no_signature() -> None:
    runner, log = _runner(BATCH_MIN_IN_FLIGHT + 10)

    def boom() -> str:
        raise RuntimeError("token said no")

    async def main() -> None:
        ok1 = asyncio.ensure_future(runner.run(lambda: _noted(log, "a", "a")))
        bad = asyncio.ensure_future(runner.run(boom))
        gone = asyncio.ensure_future(runner.run(lambda: _noted(log, "c", "c")))
        ok2 = asyncio.ensure_future(runner.run(lambda: _noted(log, "d", "d")))
        await asyncio.sleep(0)  # all four are waiting now
        gone.cancel()
        assert await ok1 == "a" and await ok2 == "d"
        with pytest.raises(RuntimeError, match="token said no"):
            await bad
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(asyncio.wait_for(main(), 5))  # a waiter left hanging fails, not hangs
    assert log == ["a", "d"]  # the cancelled caller's signature was never made
