"""What the servicers depend on, as small interfaces passed in one object.

The servicers build nothing: the composition root (``badged.app``) creates
every adapter and hands them over here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from badged.attest.process import ProcessAttestor
from badged.core.clock import Clock
from badged.errors import BadgedError
from badged.identity.registry import AgentRegistry, SigningKey
from badged.keystore.port import KeyHandle, KeyStore
from badged.listener.callstate import CallGone, commit_if_wanted, current_call, wanted_now
from badged.listener.peers import PeerRegistry
from badged.policy.grants import GrantStore
from badged.policy.loader import load_policy
from badged.policy.model import Policy
from badged.policy.ratelimit import RateLimiter
from badged.service.approvals import ApprovalBoard
from badged.sshagent.ca import SshCa
from badged.statuslist import StatusList

_logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class AuditSink(Protocol):
    """Durable audit: ``append`` returns only once the record is on disk."""

    async def append(self, event: Mapping[str, Any]) -> object: ...


class PolicyHolder:
    """The policy in force; a failed reload keeps the last good one."""

    def __init__(self, policy: Policy, path: Path | None) -> None:
        self._policy = policy
        self._path = path
        self._lock = threading.Lock()

    @property
    def current(self) -> Policy:
        return self._policy

    @property
    def path(self) -> Path | None:
        return self._path

    def replace(self, policy: Policy) -> None:
        with self._lock:
            self._policy = policy

    def reload(self) -> Policy:
        """Load the file again; raise ConfigError (old policy stays) if invalid."""
        if self._path is None:
            return self._policy
        new = load_policy(self._path)
        with self._lock:
            self._policy = new
        _logger.info("policy loaded", extra={"policy": str(self._path),
                                             "agents": len(new.agents),
                                             "bundles": len(new.bundles)})
        return new

    def try_reload(self) -> BadgedError | None:
        try:
            self.reload()
        except BadgedError as exc:
            _logger.error("policy reload rejected; keeping the previous policy",
                          extra={"error": str(exc)})
            return exc
        return None


BATCH_MIN_IN_FLIGHT = 6
"""Calls in flight from which PKCS#11 signatures are gathered (see SigningRunner)."""


class SigningRunner:
    """Where hardware signatures run: on the event loop, or on one signing thread.

    A TPM needs ~200 ms per signature (docs/tpm.md): signing on the event loop
    would stall every other call on both sockets, admin included, for that
    long. A SoftHSM signature takes ~65 µs, less than the two thread
    hand-offs it would cost to move it (docs/performance.md), so PKCS#11
    signs inline. One thread, because the device serializes anyway. A caller
    that goes away mid-signature only discards the result: nothing is
    audited or answered for it.

    Under load, inline signatures are *gathered*: with ``BATCH_MIN_IN_FLIGHT``
    or more calls in flight (``in_flight``, the front's count), a signature
    waits for the end of the loop's current pass and the gathered ones run
    back to back. Measured inside the daemon a SoftHSM signature cost ~90 µs
    of CPU against ~48 µs in a tight loop: the Python work between two
    signatures evicts OpenSSL's P-256 tables and SoftHSM's state from the
    caches; back to back they stay warm (16 lean clients: Sign +11 %,
    FetchToken +15 %). Below the threshold the wait would only add latency
    (4 clients: -3 to -14 %), so a signature runs at once as before. A
    gathered signature whose caller was cancelled meanwhile is not made.

    Nothing is signed for a call that is no longer wanted (issue 16): right
    before each signature -- inline, gathered, or handed to the TPM thread --
    the front's per-call check (``callstate``) must say the caller is still
    there and within its deadline, else ``CallGone`` is raised and no token
    exists to be audited or leaked; if it is, the call is committed (no
    longer cancelled by a reset or its deadline) so its audit record is
    written.
    """

    def __init__(self, *, off_loop: bool) -> None:
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="badged-sign")
                      if off_loop else None)
        self.in_flight: Callable[[], int] | None = None
        self._gathered: list[tuple[Callable[[], Any], asyncio.Future[Any], Any]] = []

    async def run(self, fn: Callable[[], _T]) -> _T:
        call = current_call()
        if self._pool is not None:
            if call is not None and not wanted_now(call):
                raise CallGone()

            def checked() -> _T:  # on the signing thread, right before the device works
                commit_if_wanted(call)
                return fn()

            return await asyncio.get_running_loop().run_in_executor(self._pool, checked)
        if self.in_flight is None or self.in_flight() < BATCH_MIN_IN_FLIGHT:
            commit_if_wanted(call, on_loop=True)  # the one socket check, right before
            return fn()
        if call is not None and not call.wanted():  # gathered: checked again, reading
            raise CallGone()                        # the socket, right before it signs
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.create_future()
        self._gathered.append((fn, fut, call))
        if len(self._gathered) == 1:
            loop.call_soon(self._sign_gathered)
        return await fut

    def _sign_gathered(self) -> None:
        gathered, self._gathered = self._gathered, []
        for fn, fut, call in gathered:
            if fut.done():  # the caller was cancelled: no signature for nobody
                continue
            if call is not None:
                if not wanted_now(call):
                    fut.cancel()  # reset or past its deadline meanwhile: the front sorts out which
                    continue
                call.commit()
            try:
                fut.set_result(fn())
            except BaseException as exc:  # delivered to its own caller only
                fut.set_exception(exc)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


INLINE_SIGNING = SigningRunner(off_loop=False)


class TokenKeys(Protocol):
    """Where token signing keys and the JWKS come from: the registry itself
    (direct mode) or a SessionKeyManager (session mode, docs/tpm.md)."""

    def token_key(self, name: str) -> SigningKey: ...

    def jwks(self) -> dict[str, list[dict[str, str]]]: ...


@dataclass(frozen=True)
class ServiceDeps:
    agents: AgentRegistry
    policy: PolicyHolder
    peers: PeerRegistry
    attestor: ProcessAttestor
    audit: AuditSink
    clock: Clock
    new_jti: Callable[[], str]
    issuer: str
    default_ttl: int
    max_ttl: int
    admin_uids: frozenset[int]
    operator_gid: int | None
    # The device's own key in the token: signs audit checkpoints, enrollment
    # requests and client attestations. Never used for agent credentials.
    device_key: KeyHandle
    keystore: KeyStore
    state_dir: Path
    grants: GrantStore
    limiter: RateLimiter
    approvals: ApprovalBoard
    trust_domain: str
    # Access tokens and the JWKS; None means the registry (direct mode).
    token_keys: TokenKeys | None = None
    signing: SigningRunner = INLINE_SIGNING
    # The Token Status List (issue 21); None: tokens carry no status claim.
    status: StatusList | None = None
    # The operator's SSH CA ([ssh] ca_key, badged.sshagent.ca); None: no certificates.
    ssh_ca: SshCa | None = None

    @property
    def tokens(self) -> TokenKeys:
        return self.token_keys if self.token_keys is not None else self.agents
