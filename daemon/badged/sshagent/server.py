"""The SSH agent socket: OpenSSH's ``SSH_AUTH_SOCK`` protocol over the agents' keys.

Each accepted connection is attested exactly as on the workload socket: the
kernel's peer credentials and executable snapshot are read at accept
(:func:`~badged.listener.peers.read_peer`) and every request attests the
process again (:meth:`~badged.attest.process.ProcessAttestor.attest`, which
refuses a connection whose process exec'd since). The policy decides which
agent identities the caller is bound to (a bundle in effect with kind
``ssh``); only those agents' SSH keys are listed, and a sign request goes
through the one issuance pipeline (:class:`~badged.service.issuance.Issuance`:
policy gate with approvals and rate budgets, the agent's own ``ssh`` purpose
key on the SigningRunner, durable audit record, then the answer).

What is signed is classified first (:func:`~badged.sshagent.wire.classify`):
user auth (user name, and the destination host key if the client bound the
session with ``session-bind@openssh.com``) or SSHSIG (namespace). The policy
sees those, so a bundle can say "git signatures only" or "these hosts only";
an unclassified request matches no bundle.

Messages that would change the agent (add/remove keys, lock, smartcards)
are refused with SSH_AGENT_FAILURE and audited: keys are the operator's.

Bounds before authorization: a frame above 256 KiB is refused (failure,
then close) before it is buffered; one request per connection is handled at
a time (reading pauses while one is running once a whole frame's worth is
buffered behind it, so at most one frame waits); connections per uid are
capped like the workload socket's; an idle connection is closed.

Cost per sign request (docs/ssh.md, "Performance"): the calls in flight
count with the gRPC front's, so the audit log shares fsyncs and the signing
runner gathers signatures under load exactly as for ``Sign``; reading is
not paused and resumed around every request (two epoll changes each); the
SSH key blob and key id of an agent's JWK are computed once per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.core.jose import jwk_thumbprint
from badged.errors import BadgedError, FailedPreconditionError
from badged.identity.registry import SigningKey
from badged.listener.front import READ_SIZE
from badged.listener.peers import PeerCredentials, read_peer
from badged.listener.sockets import bind_unix
from badged.policy.model import Request, bundles_in_effect, candidates
from badged.service.deps import ServiceDeps
from badged.service.issuance import Authorized, Caller, Issuance, Minted
from badged.sshagent import wire

_logger = logging.getLogger(__name__)
_SHA256 = ec.ECDSA(hashes.SHA256())
CHANNEL = "ssh"


class CallCounter(Protocol):
    """The daemon's count of calls in flight (the gRPC front's), shared by this socket.

    The audit log writes a lone call's record inline on the loop thread and
    gathers records into one fsync only when it sees calls in flight; the
    signing runner gathers signatures the same way. SSH requests must count
    there too, or under SSH load every record is fsync'd alone on the loop
    thread, one after another (measured: ~270 signs/s at 16 clients).
    """

    def call_started(self) -> None: ...

    def call_done(self, _task: object) -> None: ...


class _NoCounter:
    def call_started(self) -> None:
        pass

    def call_done(self, _task: object) -> None:
        pass


class SshAgentServer:
    """Owns the listening socket and its connections."""

    def __init__(self, deps: ServiceDeps, path: Path, *, max_per_uid: int,
                 idle_timeout: float, calls: CallCounter | None = None) -> None:
        self.deps = deps
        self.calls: CallCounter = calls if calls is not None else _NoCounter()
        self.path = path
        self.max_per_uid = max_per_uid
        self.idle_timeout = idle_timeout
        self.issuance = Issuance(deps)
        self.per_uid: dict[int, int] = {}
        self.conns: set[_Conn] = set()
        # (x, y) of an agent's SSH JWK -> (key blob, key id): pure functions of
        # the public key, so a rotation simply makes a new entry.
        self._blobs: dict[tuple[str, str], tuple[bytes, str]] = {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = bind_unix(self.path, mode=0o666, group=None)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Conn(self), sock=sock)
        _logger.info("ssh agent socket ready", extra={"socket": str(self.path)})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.conns):
                conn.abort()
            with contextlib.suppress(OSError):
                self.path.unlink()

    # -- what a caller may use -----------------------------------------------------

    def bound_agents(self, selectors: frozenset[str]) -> list[str]:
        """Agents this caller may use over SSH: a bundle in effect with kind ``ssh``."""
        d = self.deps
        policy = d.policy.current
        now = d.clock()
        grants = d.grants.grants()
        out: list[str] = []
        for rule in candidates(policy, selectors):
            if rule.agent in out:
                continue
            if any("ssh" in b.kinds for b, _ in bundles_in_effect(policy, rule, grants, now)):
                out.append(rule.agent)
        return out

    def identities(self, selectors: frozenset[str]) -> list[tuple[str, bytes, str, str]]:
        """(agent, key blob, comment, kid) of the caller's bound agents with an SSH key."""
        out = []
        for agent in self.bound_agents(selectors):
            try:
                rec = self.deps.agents.active(agent)
            except BadgedError:
                continue
            jwk = rec.current.ssh_jwk
            if jwk:
                blob, kid = self._blob(jwk)
                out.append((agent, blob, rec.spiffe_id, kid))
        return out

    def agent_of(self, selectors: frozenset[str], key_blob: bytes) -> tuple[str | None, str]:
        """(agent, kid) whose current SSH key is ``key_blob``, among the caller's rules.

        Only which agent the key belongs to: whether the caller may use it
        for *this* request (a bundle with kind ``ssh`` in effect, namespace,
        host...) is the policy gate's decision right after, audited either
        way. So no bundles or grants are looked at twice per signature.
        """
        seen: set[str] = set()
        for rule in candidates(self.deps.policy.current, selectors):
            if rule.agent in seen:
                continue
            seen.add(rule.agent)
            try:
                jwk = self.deps.agents.active(rule.agent).current.ssh_jwk
            except BadgedError:
                continue
            if jwk:
                blob, kid = self._blob(jwk)
                if blob == key_blob:
                    return rule.agent, kid
        return None, ""

    def _blob(self, jwk: dict[str, str]) -> tuple[bytes, str]:
        key = (jwk["x"], jwk["y"])
        hit = self._blobs.get(key)
        if hit is None:
            if len(self._blobs) >= 4096:  # bounded: rotations add entries
                self._blobs.clear()
            hit = self._blobs[key] = (wire.jwk_blob(jwk), jwk_thumbprint(jwk))
        return hit

    def ssh_key(self, agent: str) -> SigningKey:
        """The agent's current SSH key (what ``AgentRegistry.ssh_key`` returns), with
        its key id from this server's per-key cache instead of a fresh RFC 7638
        thumbprint (JSON + SHA-256) on every signature."""
        rec = self.deps.agents.active(agent)
        v = rec.current
        if not v.ssh_key or not v.ssh_jwk:
            raise FailedPreconditionError(f"agent {agent} has no SSH key")
        _, kid = self._blob(v.ssh_jwk)
        return SigningKey(agent, rec.spiffe_id, kid, self.deps.keystore.get(v.ssh_key),
                          v.version)


class _Conn(asyncio.Protocol):
    """One client connection: frames in, one request at a time, answers out."""

    def __init__(self, server: SshAgentServer) -> None:
        self.s = server
        self.transport: asyncio.Transport | None = None
        self.peer: PeerCredentials | None = None
        self.buf = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.binds: list[wire.SessionBind] = []
        self.last_active = time.monotonic()
        self.idle: asyncio.TimerHandle | None = None
        self.pidfd_closed = False
        self.paused = False

    # -- transport events ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        s = self.s
        try:
            self.peer = read_peer(transport.get_extra_info("socket"), CHANNEL)
        except OSError:
            transport.abort()
            return
        uid = self.peer.uid
        if s.per_uid.get(uid, 0) >= s.max_per_uid:
            _logger.warning("ssh agent: connection limit for uid reached",
                            extra={"uid": uid, "limit": s.max_per_uid})
            self._release_peer()
            transport.abort()
            return
        s.per_uid[uid] = s.per_uid.get(uid, 0) + 1
        s.conns.add(self)
        # Reads below glibc's mmap threshold (asyncio's 256 KiB default cost an
        # mmap and a munmap per message, ~17 µs; see badged.listener.front).
        transport.max_size = READ_SIZE  # type: ignore[attr-defined]
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.peer is None:
            return
        self.buf += data
        self.last_active = time.monotonic()
        if self.task is not None and not self.task.done():
            # A request is running: keep what follows, up to one whole frame.
            if len(self.buf) > wire.MAX_MESSAGE + 4 and not self.paused:
                assert self.transport is not None
                self.transport.pause_reading()
                self.paused = True
            return
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close()

    # -- internals -------------------------------------------------------------------

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.idle is not None:
            self.idle.cancel()
        if self in self.s.conns:
            self.s.conns.discard(self)
            assert self.peer is not None
            uid = self.peer.uid
            self.s.per_uid[uid] -= 1
            if not self.s.per_uid[uid]:
                del self.s.per_uid[uid]
        if self.task is None or self.task.done():
            self._release_peer()
        # else: the request in flight finishes (its audit record included),
        # its answer is dropped, and it releases the pidfd.

    def _release_peer(self) -> None:
        if self.peer is not None and self.peer.pidfd >= 0 and not self.pidfd_closed:
            self.pidfd_closed = True
            with contextlib.suppress(OSError):
                os.close(self.peer.pidfd)

    def _arm_idle(self) -> None:
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(self.s.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        if self.closed:
            return
        busy = self.task is not None and not self.task.done()
        if not busy and time.monotonic() - self.last_active >= self.s.idle_timeout:
            self.abort()
            return
        self._arm_idle()

    def _next(self) -> None:
        """Start the next complete request, if any and none is running."""
        if self.closed or (self.task is not None and not self.task.done()):
            return
        assert self.transport is not None
        if len(self.buf) < 4:
            self._resume()
            return
        length = int.from_bytes(self.buf[:4], "big")
        if length == 0 or length > wire.MAX_MESSAGE:
            # Refused before it is buffered: answer, then drop the connection
            # (the rest of the frame is never read).
            _logger.info("ssh agent: oversized or empty frame refused",
                         extra={"length": length, "uid": self.peer.uid if self.peer else None})
            self.transport.write(wire.failure())
            self.transport.close()
            self._close()
            return
        if len(self.buf) < 4 + length:
            self._resume()
            return
        msg = bytes(self.buf[4:4 + length])
        del self.buf[:4 + length]
        self.s.calls.call_started()  # done in _serve, before the next may start
        self.task = asyncio.get_running_loop().create_task(self._serve(msg))

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    async def _serve(self, msg: bytes) -> None:
        try:
            answer = await self._answer(msg[0], msg[1:])
        except wire.WireError as exc:
            _logger.info("ssh agent: malformed message", extra={"error": str(exc)})
            answer = wire.failure()
        except BadgedError as exc:
            _logger.info("ssh agent: refused", extra={"error": str(exc)})
            answer = wire.failure()
        except Exception:  # never kill the loop for one client
            _logger.exception("ssh agent: request failed")
            answer = wire.failure()
        finally:
            self.task = None  # this request is over: the next may start
            self.s.calls.call_done(None)
        if self.closed:
            self._release_peer()
            return
        assert self.transport is not None
        self.transport.write(answer)
        self.last_active = time.monotonic()
        self._next()

    async def _answer(self, msg_type: int, body: bytes) -> bytes:
        assert self.peer is not None
        s = self.s
        if msg_type == wire.SSH_AGENTC_REQUEST_IDENTITIES:
            wire.Reader(body).end()
            proc = s.deps.attestor.attest(self.peer)
            ids = s.identities(proc.selectors())
            out = [wire.u32(len(ids))]
            for _, blob, comment, _ in ids:
                out += [wire.string(blob), wire.string(comment.encode())]
            return wire.frame(wire.SSH_AGENT_IDENTITIES_ANSWER, b"".join(out))
        if msg_type == wire.SSH_AGENTC_SIGN_REQUEST:
            return await self._sign(wire.parse_sign_request(body))
        if msg_type == wire.SSH_AGENTC_EXTENSION:
            name, r = wire.parse_extension(body)
            if name == wire.SESSION_BIND:
                if len(self.binds) >= 16:
                    raise wire.WireError("too many session binds")
                self.binds.append(wire.parse_session_bind(r))
                return wire.success()
            return wire.failure()
        if msg_type in wire.MUTATING:
            await self._refuse_mutation(msg_type)
        return wire.failure()

    async def _refuse_mutation(self, msg_type: int) -> None:
        """ssh-add, ssh-add -D, -x, -s ...: refused and on record."""
        assert self.peer is not None
        try:
            who: dict[str, object] = self.s.deps.attestor.attest(self.peer).summary()
        except BadgedError:
            who = {"pid": self.peer.pid, "uid": self.peer.uid}
        await self.s.deps.audit.append({
            "event": "ssh.denied", "agent": None, "caller": who, "decision": "deny",
            "rule": "-", "reason": f"agent-changing message refused: "
                                   f"{wire.MUTATING_NAMES.get(msg_type, 'unknown')} "
                                   f"(keys are the operator's)",
            "ssh": {"message": msg_type}})

    def _destination(self, signed: wire.SignedData) -> str:
        """The destination host key fingerprint, from a verified session-bind only.

        The host key inside a hostbound userauth request is the client's
        word; the bind was signed by that host over this session's id. A
        bind made for forwarding names the hop, not the destination: unknown.
        """
        for bind in reversed(self.binds):
            if bind.session_id == signed.session_id:
                if bind.forwarding:
                    return ""
                if signed.host_key and signed.host_key != bind.host_key:
                    raise wire.WireError("userauth host key differs from the bound host key")
                return bind.host_fingerprint
        return ""

    async def _sign(self, req: wire.SignRequest) -> bytes:
        assert self.peer is not None
        s = self.s
        d = s.deps
        peer = self.peer
        proc = d.attestor.attest(peer)
        caller = Caller(peer, proc)
        signed = wire.classify(req.data)
        # A certificate signs with the key inside it; the client may name the
        # certificate in one place and the plain key in the other.
        key_blob = wire.plain_key_blob(req.key_blob)
        certificate = key_blob != req.key_blob
        if signed.purpose == "auth":
            try:
                named = wire.plain_key_blob(signed.key_blob)
            except wire.WireError:
                named = b""
            certificate = certificate or named != signed.key_blob
            if named != key_blob:
                signed = wire.SignedData("")  # asks to sign for another key: unclassified
        host = self._destination(signed) if signed.purpose == "auth" else ""
        details: dict[str, Any] = {
            "purpose": signed.purpose or "unclassified", "key_fp": wire.fingerprint(key_blob),
            "certificate": certificate,
            "user": signed.user, "host_fp": host, "namespace": signed.namespace,
            "forwarded": any(b.forwarding for b in self.binds),
            "data_len": len(req.data),
            "data_sha256": hashlib.sha256(req.data).hexdigest()}
        agent, kid = s.agent_of(proc.selectors(), key_blob)
        if agent is None:
            await d.audit.append({
                "event": "ssh.denied", "agent": None, "caller": proc.summary(),
                "decision": "deny", "rule": "-",
                "reason": "key is not the SSH key of an agent this caller matches",
                "ssh": details})
            raise FailedPreconditionError("ssh: key not bound to caller")
        request = Request(kind="ssh", agent=agent, ssh_purpose=signed.purpose,
                          ssh_namespace=signed.namespace, ssh_host=host, ssh_user=signed.user)
        data = req.data

        def mint(auth: Authorized) -> Minted[bytes]:
            if auth.key.kid != kid:  # rotated between listing and signing
                raise FailedPreconditionError("ssh: the agent's SSH key changed meanwhile")
            sig = wire.signature_blob(auth.key.handle.sign(data, _SHA256))
            return Minted(sig, auth.key.spiffe_id, {"ssh": details})

        _, sig = await s.issuance.issue(caller, request, "ssh.signed", s.ssh_key, mint)
        return wire.frame(wire.SSH_AGENT_SIGN_RESPONSE, wire.string(sig))
