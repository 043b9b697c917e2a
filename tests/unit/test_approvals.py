"""ApprovalBoard corners that an end-to-end run cannot time: a grant revoked
between the approval and the waiting request resuming, and the order of the
checks in ``decide`` (requester first, then the policy as it is now)."""

from __future__ import annotations

import asyncio
import os

import pytest

from badged.attest.process import ProcessAttributes
from badged.core.clock import FixedClock
from badged.errors import PolicyDeniedError
from badged.listener.peers import PeerCredentials, exe_identity, proc_start_time
from badged.policy.model import Decision, Request
from badged.service.approvals import ApprovalBoard, PendingApproval

REQ = Request("token", "bot", "https://prod")


def _proc(uid: int) -> ProcessAttributes:
    return ProcessAttributes(pid=os.getpid(), uid=uid, gid=uid, groups=(), exe=None,
                             exe_sha256=None, cgroup=None)


def _peer() -> PeerCredentials:
    me = os.getpid()
    return PeerCredentials(me, os.getuid(), os.getgid(), -1, proc_start_time(me), "workload",
                           exe_identity(me))


def _decision(grant: str | None = "g-1") -> Decision:
    return Decision(True, "bot", "p:1 via step-up", "allowed", 60, bundle="prod",
                    approval_required=True, grant=grant)


async def _open(board: ApprovalBoard, uid: int = 1002,
                grant: str | None = "g-1") -> tuple[asyncio.Task[PendingApproval], str]:
    task = asyncio.create_task(board.request(_decision(grant), REQ, "why", _proc(uid), _peer()))
    for _ in range(100):
        await asyncio.sleep(0)
        pending = [a for a in board.list() if a.state == "pending"]
        if pending:
            return task, pending[-1].id
    raise AssertionError("no pending approval")


def test_revoking_the_grant_after_approval_but_before_resume_cancels() -> None:
    async def run() -> None:
        board = ApprovalBoard(clock=FixedClock(0.0), timeout=30)
        task, aid = await _open(board)
        item = board.decide(aid, approve=True, by="root", by_uid=0)
        assert item.state == "approved" and not item.collected
        # Same loop pass, before the waiting request runs again: revoke.
        assert [a.id for a in board.cancel_for_grant("g-1", by="root")] == [aid]
        with pytest.raises(PolicyDeniedError, match="cancelled"):
            await task
        # Once collected, a later revocation leaves the outcome alone.
        task, aid = await _open(board)
        board.decide(aid, approve=True, by="root", by_uid=0)
        assert (await task).collected
        assert board.cancel_for_grant("g-1", by="root") == ()
        # Approvals opened by an agent's own bundle are not any grant's.
        task, aid = await _open(board, grant=None)
        assert board.cancel_for_grant("g-1", by="root") == ()
        board.decide(aid, approve=False, by="root", by_uid=0)
        with pytest.raises(PolicyDeniedError):
            await task

    asyncio.run(run())


def test_requester_uid_and_recheck() -> None:
    async def run() -> None:
        board = ApprovalBoard(clock=FixedClock(0.0), timeout=30)
        task, aid = await _open(board, uid=1002)
        with pytest.raises(PolicyDeniedError, match="may not approve it"):
            board.decide(aid, approve=True, by="bot", by_uid=1002)
        assert board.decide(aid, approve=True, by="bot", by_uid=1002,
                            requester_may_approve=True).state == "approved"
        await task
        task, aid = await _open(board, uid=1002)
        seen: list[str] = []

        def recheck(item: PendingApproval) -> str | None:
            seen.append(item.id)
            return "no such active grant"

        item = board.decide(aid, approve=True, by="root", by_uid=0, recheck=recheck)
        assert seen == [aid] and item.state == "cancelled" and "no longer allows" in item.comment
        with pytest.raises(PolicyDeniedError, match="cancelled"):
            await task
        # Denying needs no re-check and is open to the requester.
        task, aid = await _open(board, uid=1002)
        assert board.decide(aid, approve=False, by="bot", by_uid=1002,
                            recheck=recheck).state == "denied"
        assert len(seen) == 1  # recheck was not called for a denial
        with pytest.raises(PolicyDeniedError):
            await task

    asyncio.run(run())
