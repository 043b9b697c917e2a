"""Is the call being served still wanted? A cheap check for the steps that cost or mint.

The front records the current call in a context variable at the start of its
task (each task has its own context, so this is per call). A step that would
create something for the caller -- a hardware signature above all -- asks
``call_wanted()`` right before doing it: a caller that reset the stream, went
away, or whose ``grpc-timeout`` has passed gets nothing minted (issue 16: 5,000
calls reset 0.5 ms after sending used to produce 4,028 ``token.issued`` records
for 41 answers). Outside a front call (tests, the CLI) everything is wanted.

Right before the signature the caller's input already received by the
kernel is processed (``wanted_now``): a reset that reached the daemon's
socket counts even if the busy loop had not read it yet.

A step that does create something then ``commit()``s the call: from there on
neither a reset nor the deadline cancels it, so the audit record of what was
made is always written (the answer is simply not delivered to a caller that
left). Hence: a credential is audited if and only if it was made, and made
only for a caller that was still there and in time.

A credential made for a caller that resets the call *after* its signature
never reaches it once the front has seen the reset: nothing is sent on a
reset stream. If it has seen it when the credential's record is written
(``gone_now``), the record says ``<kind>.withheld`` instead of
``<kind>.issued`` (service/denials.py): the credential exists only in the
daemon's memory and is dropped. If it sees it while the record is being
made durable, an ``<kind>.undelivered`` record follows the ``issued`` one
(the answer would have gone out in the step the write returns). A reset
still unread in the socket then does not stop the answer: it is written to
the caller's socket, i.e. delivered to the caller that asked.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Protocol


class WantedCall(Protocol):
    def wanted(self) -> bool: ...

    def commit(self) -> None: ...

    def catch_up(self) -> None:
        """Process what the caller already sent (loop thread only): a reset may be waiting."""

    def gone(self) -> bool:
        """The caller reset the call or closed the connection: no answer can reach it."""


CURRENT_CALL: ContextVar[WantedCall | None] = ContextVar("badged_current_call", default=None)


class CallGone(asyncio.CancelledError):
    """The caller reset the call, disconnected, or ran past its deadline: stop, answer nothing.

    A ``CancelledError`` so that no handler or interceptor turns it into an
    answer or an audit record of a refusal; the front answers
    DEADLINE_EXCEEDED if the deadline passed and nothing if the caller left.
    """


def current_call() -> WantedCall | None:
    return CURRENT_CALL.get()


def call_wanted() -> bool:
    call = CURRENT_CALL.get()
    return call is None or call.wanted()


def ensure_wanted() -> None:
    """Raise ``CallGone`` unless the current call is still wanted."""
    call = CURRENT_CALL.get()
    if call is not None and not call.wanted():
        raise CallGone()


def wanted_now(call: WantedCall) -> bool:
    """On the loop thread, right before a signature: is ``call`` wanted, counting what its
    caller has already sent?

    A busy loop may not have read the caller's socket since the request: a
    RST_STREAM (or the end of the connection) can be sitting in the socket
    buffer, already sent but not yet seen. ``catch_up`` reads and processes
    it first, so "reset" means "the reset reached the daemon", not "the loop
    happened to get to it" (bench/run --hostile: 823 of 17,451 abandoned calls
    were signed with their reset already waiting).
    """
    call.catch_up()
    return call.wanted()


def gone_now(*, catch_up: bool = True) -> bool:
    """On the loop thread, in a front call: has its caller reset it or gone away? With
    ``catch_up``, counting what it has already sent but the loop has not read."""
    call = CURRENT_CALL.get()
    if call is None:
        return False
    if catch_up:
        call.catch_up()
    return call.gone()


def commit_if_wanted(call: WantedCall | None, *, on_loop: bool = False) -> None:
    """Right before making something for ``call``: refuse (``CallGone``) or commit to it.

    ``on_loop``: called on the event loop's thread, so the caller's pending
    input is processed first (``wanted_now``).
    """
    if call is not None:
        if not (wanted_now(call) if on_loop else call.wanted()):
            raise CallGone()
        call.commit()
