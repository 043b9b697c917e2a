"""Human approval of requests whose bundle requires it.

A request that needs approval waits (bounded) while operators see it with
full context (``badgectl approvals``) and decide (``approve``/``deny``).
Timeouts deny. The wait is measured on the event loop's monotonic clock, so
wall-clock jumps neither shorten nor extend it; the caller's pidfd is polled
so a caller that exits while waiting is cancelled, not approved posthumously.

An approval is a second look, not a blank cheque (issue 13):

* the uid that made the request may not approve it (a policy switch,
  ``[approval] requester_may_approve``, allows it on a single-user dev box);
* the policy is evaluated again when an operator approves (``recheck``):
  a step-up grant that was revoked or expired, an agent revoked, a rule
  changed -- the approval is cancelled and nothing is issued;
* revoking a step-up grant cancels the approvals it opened at once, including
  one approved whose waiting request has not yet resumed.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from badged.attest.process import ProcessAttributes
from badged.core.clock import Clock
from badged.errors import FailedPreconditionError, NotFoundError, PolicyDeniedError
from badged.listener.peers import PeerCredentials
from badged.policy.model import Decision, Request

_POLL = 0.25
_KEEP_DECIDED = 200


@dataclass
class PendingApproval:
    id: str
    agent: str
    bundle: str
    request: Request
    reason: str
    process: ProcessAttributes
    requested_at: float
    deadline: float
    state: str = "pending"  # pending | approved | denied | expired | cancelled
    decided_by: str = ""
    decided_at: float = 0.0
    comment: str = ""
    event: asyncio.Event = field(default_factory=asyncio.Event)
    grant: str | None = None  # the step-up grant whose bundle asked for approval
    collected: bool = False  # the waiting request has resumed with the outcome
    txn: str = ""  # the issuance's transaction id (badgectl audit trace)


# Why the policy no longer allows a pending request (None: it still does).
Recheck = Callable[[PendingApproval], "str | None"]


class ApprovalBoard:
    def __init__(self, *, clock: Clock, timeout: float) -> None:
        self._clock = clock
        self.timeout = timeout
        self._items: OrderedDict[str, PendingApproval] = OrderedDict()

    def list(self) -> list[PendingApproval]:
        return list(self._items.values())

    async def request(self, decision: Decision, req: Request, reason: str,
                      proc: ProcessAttributes, peer: PeerCredentials,
                      txn: str = "") -> PendingApproval:
        """Open a pending approval and wait for its outcome; raise unless approved.

        The operator sees the request's context (``req.context``, asserted by
        the agent, never attested) and its transaction id.
        """
        assert decision.agent is not None and decision.bundle is not None
        now = self._clock()
        item = PendingApproval(
            id="a-" + secrets.token_hex(5), agent=decision.agent, bundle=decision.bundle,
            request=req, reason=reason[:256], process=proc, requested_at=now,
            deadline=now + self.timeout, grant=decision.grant, txn=txn)
        self._items[item.id] = item
        self._trim()
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timeout
        try:
            while item.state == "pending":
                left = end - loop.time()
                if left <= 0:
                    item.state = "expired"
                    break
                if not peer.is_alive():
                    item.state = "cancelled"
                    break
                try:
                    await asyncio.wait_for(item.event.wait(), timeout=min(_POLL, left))
                except TimeoutError:
                    continue
        except asyncio.CancelledError:
            item.state = "cancelled"
            raise
        if item.state == "approved":
            item.collected = True
            return item
        raise PolicyDeniedError(
            f"approval {item.id} {item.state}",
            public={"denied": "denied by an operator",
                    "expired": "approval timed out"}.get(item.state, "approval cancelled"))

    def decide(self, approval_id: str, *, approve: bool, by: str, by_uid: int | None = None,
               comment: str = "", requester_may_approve: bool = False,
               recheck: Recheck | None = None) -> PendingApproval:
        """Approve or deny; an approval the policy no longer allows comes back cancelled.

        Runs on the event loop with no await between the re-check and the
        state change, so nothing can revoke in between.
        """
        item = self._items.get(approval_id)
        if item is None:
            raise NotFoundError(f"approval {approval_id!r} not found")
        if item.state != "pending":
            raise FailedPreconditionError(f"approval {approval_id} is already {item.state}",
                                          public=f"approval is already {item.state}")
        if approve and by_uid is not None and by_uid == item.process.uid \
                and not requester_may_approve:
            raise PolicyDeniedError(
                f"uid {by_uid} requested approval {approval_id} and may not approve it",
                public="denied by policy: the requesting uid may not approve its own request")
        if approve and recheck is not None:
            why = recheck(item)
            if why is not None:
                self._cancel(item, by, f"policy no longer allows it: {why}")
                return item
        item.state = "approved" if approve else "denied"
        item.decided_by = by
        item.decided_at = self._clock()
        item.comment = comment[:256]
        item.event.set()
        return item

    def cancel_for_grant(self, grant_id: str, *, by: str) -> tuple[PendingApproval, ...]:
        """Cancel what a (now revoked) step-up grant opened, approved-but-unissued included."""
        out: tuple[PendingApproval, ...] = ()
        for item in self._items.values():
            if item.grant == grant_id and (
                    item.state == "pending" or (item.state == "approved" and not item.collected)):
                self._cancel(item, by, f"step-up grant {grant_id} revoked")
                out += (item,)
        return out

    def _cancel(self, item: PendingApproval, by: str, why: str) -> None:
        item.state = "cancelled"
        item.decided_by = by
        item.decided_at = self._clock()
        item.comment = why[:256]
        item.event.set()

    def _trim(self) -> None:
        decided = [k for k, v in self._items.items() if v.state != "pending"]
        for key in decided[: max(0, len(decided) - _KEEP_DECIDED)]:
            del self._items[key]
