"""The one issuance pipeline: attest → policy gate → key → sign → durable audit → answer.

Every credential badged hands out -- access token, ``Sign`` signature, client
assertion, client attestation, DPoP proof, CSR, agent certificate, SPIFFE
JWT-SVID -- goes through :meth:`Issuance.issue`. The servicers only turn
protobuf into a :class:`~badged.policy.model.Request` and a *mint* function,
and the result back into protobuf. So the rules that make an identity
unborrowable live here once, and a new credential kind cannot forget them:

* the caller is the :class:`Caller` snapshot taken from the connection (kernel
  peer credentials + attested process), never anything in the request;
* the policy decides which agent that caller is; the signing key is *that*
  agent's key, chosen here, and the mint function gets nothing else to sign
  with;
* the identity a credential speaks for (``sub``, ``client_id``, SAN) is the
  agent's own SPIFFE ID, or a client id the policy lists for that agent
  (:meth:`Issuance.client_id`); the mint function reports what it named and
  the pipeline refuses to answer with anything else (``names_other``);
* the audit record is durable before the answer leaves; a credential whose
  record could not be written is never sent.

Cost on the hot path (FetchToken, Sign): one small tuple for the caller and
one for the grant, one closure for the mint; no extra dicts, no extra awaits
besides the pipeline coroutine itself (docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Generic, NamedTuple, TypeVar

from badged.attest.process import ProcessAttributes
from badged.core.ids import new_txn
from badged.errors import (
    BadgedError,
    FailedPreconditionError,
    PolicyDeniedError,
    RateLimitedError,
)
from badged.identity.registry import SigningKey
from badged.listener.peers import PeerCredentials
from badged.policy.model import Bundle, Decision, Request, evaluate
from badged.service.approvals import PendingApproval
from badged.service.auth import resolve_caller
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx

_logger = logging.getLogger(__name__)
_T = TypeVar("_T")
# Building the per-call tuples with tuple.__new__ skips the NamedTuple
# constructor's Python frame (~0.15 µs each on the hot path, measured).
_new = tuple.__new__

KeyGetter = Callable[[str], SigningKey]


class Caller(NamedTuple):
    """Who is calling, fixed for the whole call: what the kernel said about the
    connection and what attestation read about the process behind it.

    Immutable, and the only source of the caller's identity in the pipeline:
    nothing in a request can change it.
    """

    peer: PeerCredentials
    proc: ProcessAttributes

    @property
    def selectors(self) -> frozenset[str]:
        return self.proc.selectors()

    def summary(self) -> dict[str, object]:
        return self.proc.summary()


class Authorized(NamedTuple):
    """What the gate allowed: the decision, the approval if one was needed, the
    key of the agent the caller *is*, and the client id the credential may
    carry (the agent's SPIFFE ID unless the policy lists another)."""

    decision: Decision
    approval: PendingApproval | None
    key: SigningKey
    client_id: str
    # Transaction id (issue 21): in the credential (claim "txn") and in every
    # audit record of this issuance, so `badgectl audit trace` joins them.
    txn: str


class Minted(NamedTuple, Generic[_T]):
    """A mint function's result.

    ``names``: the identity the credential speaks for (its ``sub``, client id
    or SAN); the pipeline checks it is the caller's own. ``record``: the
    kind's own audit fields, a fresh dict the pipeline completes and logs.
    ``before``: further audit events that must be durable first (e.g. an
    agent certificate issued on the way).
    """

    value: _T
    names: str
    record: dict[str, Any]
    before: tuple[Mapping[str, Any], ...] = ()


class PolicyGate:
    """Decide, enforce budget and approval, audit denials."""

    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps

    def decide(self, proc: ProcessAttributes, req: Request, *, consume: bool = True) -> Decision:
        d = self._d
        now = d.clock()

        def budget(agent: str, bundle: Bundle) -> float | None:
            return d.limiter.wait_time(agent, bundle)

        decision = evaluate(d.policy.current, proc.selectors(), req, now=now,
                            default_ttl=d.default_ttl, max_ttl=d.max_ttl, grants=d.grants.grants(),
                            delegations=d.grants.delegations(), budget=budget)
        if decision.allowed and decision.agent is not None:
            status = self.agent_status(decision.agent)
            if status != "active":
                decision = Decision(False, decision.agent, decision.rule, f"agent is {status}",
                                    trace=decision.trace)
        if decision.allowed and consume and decision.bundle is not None:
            bundle = self._bundle(decision.bundle)
            if bundle is not None and decision.agent is not None:
                d.limiter.consume(decision.agent, bundle)
        return decision

    def _bundle(self, name: str) -> Bundle | None:
        policy = self._d.policy.current
        if policy.baseline is not None and policy.baseline.name == name:
            return policy.baseline
        return policy.bundles.get(name)

    def agent_status(self, name: str) -> str:
        try:
            return self._d.agents.get(name).status
        except BadgedError:
            return "missing"

    async def enforce(self, proc: ProcessAttributes, peer: PeerCredentials, req: Request,
                      reason: str = "", txn: str = "") -> tuple[Decision, PendingApproval | None]:
        d = self._d
        decision = self.decide(proc, req)
        if not decision.allowed:
            await d.audit.append({
                "event": f"{req.kind}.denied", "agent": decision.agent,
                "caller": proc.summary(), "request": request_summary(req),
                "decision": "deny", "rule": decision.rule, "reason": decision.reason,
                "trace": list(decision.trace), "txn": txn or None,
            })
            _logger.info("denied", extra={"agent": decision.agent, "uid": proc.uid,
                                          "pid": proc.pid, "explain": decision.explain(),
                                          "trace": "; ".join(decision.trace)})
            if decision.retry_after is not None:
                raise RateLimitedError(decision.reason, retry_after=decision.retry_after)
            raise PolicyDeniedError(decision.reason, public=public_reason(decision))
        approval = None
        if decision.approval_required:
            _logger.info("approval required", extra={"agent": decision.agent,
                                                     "bundle": decision.bundle})
            try:
                approval = await d.approvals.request(decision, req, reason, proc, peer, txn=txn)
            except PolicyDeniedError as exc:
                await d.audit.append({
                    "event": "approval.refused", "agent": decision.agent,
                    "caller": proc.summary(), "request": request_summary(req),
                    "decision": "deny", "rule": decision.rule, "reason": exc.detail,
                    "txn": txn or None,
                })
                raise
            await d.audit.append({
                "event": "approval.granted", "agent": decision.agent, "approval": approval.id,
                "approved_by": approval.decided_by, "request": request_summary(req),
                "caller": proc.summary(), "decision": "allow", "rule": decision.rule,
                "txn": txn or None,
            })
        return decision, approval

    def key(self, decision: Decision, getter: KeyGetter) -> SigningKey:
        assert decision.agent is not None
        try:
            return getter(decision.agent)
        except FailedPreconditionError:
            # Revoked between decision and signing: refuse like any denial.
            raise PolicyDeniedError(f"agent {decision.agent} revoked",
                                    public="denied by policy: agent is revoked") from None


class Issuance:
    """The pipeline every credential kind goes through (see the module docstring)."""

    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps
        self.gate = PolicyGate(deps)

    def caller(self, context: Ctx) -> Caller:
        """The attested caller of this call, from its connection (never the request)."""
        return _new(Caller, resolve_caller(self._d, context, "workload"))

    async def issue(self, caller: Caller, requests: Request | Sequence[Request], event: str,
                    key_of: KeyGetter, mint: Callable[[Authorized], Minted[_T]], *,
                    reason: str = "", client_id: str | None = None,
                    traceparent: str = "") -> tuple[Authorized, _T]:
        """Run one issuance: gate, key, name check, sign, audit, then return.

        ``requests``: one policy request, or several that must all be allowed
        for the same agent (a JWT-SVID with several audiences). ``client_id``:
        the client id the caller asked for (``""``: its own SPIFFE ID), for
        kinds that carry one. ``mint`` runs where hardware signatures run
        (:class:`~badged.service.deps.SigningRunner`). ``traceparent``: the
        caller's validated W3C trace context, recorded beside the transaction id.
        """
        d = self._d
        txn = _txn()
        if isinstance(requests, Request):  # the common case: no extra coroutine
            decision, approval = await self.gate.enforce(caller.proc, caller.peer, requests,
                                                         reason, txn)
        else:
            decision, approval = await self._decide_all(caller, requests, reason, txn)
        key = self.gate.key(decision, key_of)
        cid = key.spiffe_id
        if client_id:
            cid = await self.client_id(caller, decision, key, client_id, requests, event)
        auth = _new(Authorized, (decision, approval, key, cid, txn))
        minted = await d.signing.run(lambda: mint(auth))
        if minted.names != key.spiffe_id and minted.names != cid:
            # A mint function named someone else: a bug, never an answer. The
            # signed bytes are dropped here; the refusal is on record.
            _logger.error("credential names another identity; not sent",
                          extra={"event": event, "agent": key.agent})
            await d.audit.append({
                "event": event.rsplit(".", 1)[0] + ".withheld", "agent": key.agent,
                "caller": caller.proc.summary(), "decision": "deny", "rule": decision.rule,
                "reason": f"credential named {minted.names[:100]!r}, not the caller's agent"})
            raise BadgedError(f"{event} named {minted.names[:100]!r}, not {key.spiffe_id!r}")
        for rec in minted.before:
            await d.audit.append(rec)
        # The kind's own fields, completed in place (no second dict on the hot
        # path); the pipeline's fields are written last, so a kind cannot
        # change who is recorded as the agent, the caller or the decision.
        record = minted.record
        record["event"] = event
        record["agent"] = key.agent
        record["caller"] = caller.proc.summary()
        record["decision"] = "allow"
        record["rule"] = decision.rule
        record["bundle"] = decision.bundle
        record["kid"] = key.kid
        record["approval"] = approval.id if approval is not None else None
        record["txn"] = txn
        if traceparent:
            record["traceparent"] = traceparent
        req0 = requests if isinstance(requests, Request) else requests[0]
        if req0.context:
            record["context"] = dict(req0.context)
        if decision.grant is not None:
            record["grant"] = decision.grant
        await d.audit.append(record)
        return auth, minted.value

    async def _decide_all(self, caller: Caller, requests: Sequence[Request],
                          reason: str, txn: str) -> tuple[Decision, PendingApproval | None]:
        decision: Decision | None = None
        approval: PendingApproval | None = None
        rules: list[str] = []
        ttl = 0
        agent: str | None = None
        for req in requests:  # every one must be allowed, for the same agent
            if agent is not None:
                req = replace(req, agent=agent)
            decision, approved = await self.gate.enforce(caller.proc, caller.peer, req, reason,
                                                         txn)
            approval = approval or approved
            agent = decision.agent
            ttl = decision.ttl if not ttl else min(ttl, decision.ttl)
            rules.append(decision.rule)
        if decision is None:
            raise BadgedError("no request to decide")
        return replace(decision, rule="; ".join(rules), ttl=ttl), approval

    async def client_id(self, caller: Caller, decision: Decision, key: SigningKey,
                        requested: str, requests: Request | Sequence[Request],
                        event: str) -> str:
        """The client id a credential may carry: the agent's own SPIFFE ID, or
        one the policy lists (``client_ids``) on a rule that binds this caller
        to this agent. Anything else is refused and audited: one agent must
        never be able to authenticate as another agent's OAuth client."""
        if requested == key.spiffe_id:
            return requested
        selectors = caller.proc.selectors()
        for rule in self._d.policy.current.agents:
            if rule.agent == key.agent and requested in rule.client_ids \
                    and rule.matches(selectors):
                return requested
        req = requests if isinstance(requests, Request) else requests[0]
        await self._d.audit.append({
            # Named after the credential (assertion.denied, attestation.denied).
            "event": event.rsplit(".", 1)[0] + ".denied", "agent": key.agent,
            "caller": caller.proc.summary(),
            "request": {**request_summary(req), "client_id": requested}, "decision": "deny",
            "rule": decision.rule,
            "reason": f"client_id {requested[:100]!r} is not this agent's own",
        })
        _logger.info("denied: foreign client_id", extra={"agent": key.agent,
                                                        "uid": caller.proc.uid,
                                                        "pid": caller.proc.pid})
        raise PolicyDeniedError(
            f"client_id {requested[:100]!r} is neither {key.spiffe_id} nor listed for it",
            public="denied by policy: client_id must be this agent's own SPIFFE ID "
                   "or a client id the policy lists for this agent")


def _txn() -> str:
    """A fresh transaction id: 16 hex digits, random (no issuance count leaks)."""
    return new_txn()


def request_summary(req: Request) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": req.kind, "agent": req.agent, "audience": req.audience,
                           "scopes": list(req.scopes), "ttl": req.ttl,
                           "delegation": req.delegation}
    if req.context:
        out["context"] = dict(req.context)
    if req.kind == "ssh":  # what the SSH agent saw of the signature (badged.sshagent)
        out["ssh"] = {"purpose": req.ssh_purpose or "unclassified", "user": req.ssh_user,
                      "host_fp": req.ssh_host, "namespace": req.ssh_namespace}
    elif req.kind == "proxy":  # what the credential proxy saw of the call (badged.proxy)
        out["proxy"] = {"route": req.proxy_route, "method": req.proxy_method,
                        "path": req.proxy_path}
    return out


def public_reason(decision: Decision) -> str:
    """A caller-safe phrase: what was wrong with *its own* request, no rule text."""
    reason = decision.reason
    for needle, phrase in (
        ("agent is revoked", "agent is revoked"),
        ("agent is missing", "agent does not exist"),
        ("several agents", "caller may act as several agents; name one with agent="),
        ("on route", "method or path not allowed on this route for this agent"),
        ("delegation", "no such active delegation for this agent, or outside it"),
        ("audience", "audience not allowed for this agent"),
        ("scopes", "scope not allowed for this agent"),
        ("ttl", "ttl above this agent's cap"),
        ("kind", "operation not allowed for this agent"),
    ):
        if needle in reason:
            return f"denied by policy: {phrase}"
    return "denied by policy: no identity for this caller"
