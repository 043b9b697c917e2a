"""The issuance pipeline's own rules, with real policy, keys and signing runner.

What every credential kind inherits from ``badged.service.issuance``: the key
is the caller's own agent's; a credential naming anyone else is never
answered; a client id is the agent's SPIFFE ID or one the policy lists on a
rule that binds *this* caller; the audit record is durable before the answer
and its who/what fields are the pipeline's, not the kind's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from badged.attest.process import ProcessAttributes
from badged.core.tokens import ES256
from badged.errors import AuditError, BadgedError, PolicyDeniedError
from badged.identity.registry import SigningKey
from badged.keystore.memory import MemoryKeyStore
from badged.listener.peers import PeerCredentials
from badged.policy.loader import load_policy
from badged.policy.model import Request
from badged.service.deps import PolicyHolder, SigningRunner
from badged.service.issuance import Authorized, Caller, Issuance, Minted

UID = 4242
TD = "example.org"


def _spiffe(agent: str) -> str:
    return f"spiffe://{TD}/agent/{agent}"


class _Audit:
    def __init__(self, fail: bool = False) -> None:
        self.records: list[dict[str, Any]] = []
        self.fail = fail

    async def append(self, event: Mapping[str, Any]) -> object:
        if self.fail:
            raise AuditError("disk full")
        self.records.append(dict(event))
        return None


class _Limiter:
    def wait_time(self, agent: str, bundle: object) -> None:
        return None

    def consume(self, agent: str, bundle: object) -> None:
        return None


def _pipeline(tmp_path: Path, audit: _Audit) -> tuple[Issuance, Caller]:
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[bundle.creds]
audiences = ["https://as.example.com/token"]
kinds = ["assertion", "token"]
max_ttl = "5m"

[[agent]]
name = "bot"
selectors = ["unix:uid:{UID}"]
bundles = ["creds"]
client_ids = ["bot-client"]

[[agent]]
name = "bot"
selectors = ["unix:uid:{UID}", "unix:gid:31337"]
bundles = ["creds"]
client_ids = ["only-with-gid-31337"]

[[agent]]
name = "other"
selectors = ["unix:uid:1"]
bundles = ["creds"]
client_ids = ["other-client"]
""")
    deps = SimpleNamespace(
        policy=PolicyHolder(load_policy(policy), policy), clock=lambda: 1_800_000_000.0,
        limiter=_Limiter(), default_ttl=60, max_ttl=3600, audit=audit,
        grants=SimpleNamespace(grants=lambda: [], delegations=lambda: {}),
        agents=SimpleNamespace(get=lambda name: SimpleNamespace(status="active")),
        signing=SigningRunner(off_loop=False), approvals=None)
    peer = PeerCredentials(pid=7, uid=UID, gid=UID, pidfd=-1, start_time=0, channel="workload")
    proc = ProcessAttributes(pid=7, uid=UID, gid=UID, groups=(), exe=None, exe_sha256=None,
                             cgroup=None)
    return Issuance(deps), Caller(peer, proc)  # type: ignore[arg-type]


_STORE = MemoryKeyStore()


def _key(agent: str) -> SigningKey:
    name = f"k/{agent}"
    try:
        handle = _STORE.get(name)
    except BadgedError:
        handle = _STORE.generate(name)
    return SigningKey(agent, _spiffe(agent), f"kid-{agent}", handle, 1)


def _request() -> Request:
    return Request(kind="assertion", agent=None, audience="https://as.example.com/token", ttl=60)


def _run(issuance: Issuance, caller: Caller, names: str | None = None,
         client_id: str | None = None, record: dict[str, Any] | None = None
         ) -> tuple[Authorized, bytes]:
    def mint(auth: Authorized) -> Minted[bytes]:
        sig = auth.key.handle.sign(b"payload", ES256)
        return Minted(sig, names if names is not None else auth.client_id, dict(record or {}))

    return asyncio.run(issuance.issue(caller, _request(), "assertion.issued", _key, mint,
                                      client_id=client_id))


def test_the_key_is_the_callers_own_agent_and_the_record_is_the_pipelines(tmp_path: Path) -> None:
    audit = _Audit()
    issuance, caller = _pipeline(tmp_path, audit)
    auth, _ = _run(issuance, caller, record={"agent": "other", "decision": "deny", "x": 1})
    assert auth.key.agent == "bot" and auth.client_id == _spiffe("bot")
    rec = audit.records[-1]
    # A kind cannot rewrite who the credential was for, or the decision.
    assert rec["event"] == "assertion.issued" and rec["agent"] == "bot"
    assert rec["decision"] == "allow" and rec["caller"]["uid"] == UID and rec["x"] == 1


def test_a_credential_naming_someone_else_is_never_answered(tmp_path: Path) -> None:
    audit = _Audit()
    issuance, caller = _pipeline(tmp_path, audit)
    with pytest.raises(BadgedError) as info:
        _run(issuance, caller, names=_spiffe("other"))
    assert not isinstance(info.value, PolicyDeniedError)
    assert not [r for r in audit.records if r["event"] == "assertion.issued"]
    assert audit.records[-1]["event"] == "assertion.withheld"


@pytest.mark.parametrize(("requested", "allowed"), [
    ("", True),                               # default: the agent's own SPIFFE ID
    (_spiffe("bot"), True),
    ("bot-client", True),                     # listed on the rule that binds this caller
    ("only-with-gid-31337", False),           # listed on a rule this caller does not match
    ("other-client", False),                  # another agent's client id
    (_spiffe("other"), False),                # another agent's SPIFFE ID
    ("anything", False),
])
def test_client_ids(tmp_path: Path, requested: str, allowed: bool) -> None:
    audit = _Audit()
    issuance, caller = _pipeline(tmp_path, audit)
    if allowed:
        auth, _ = _run(issuance, caller, client_id=requested)
        assert auth.client_id == (requested or _spiffe("bot"))
        return
    with pytest.raises(PolicyDeniedError) as info:
        _run(issuance, caller, client_id=requested)
    assert "client_id" in info.value.caller_message
    denied = audit.records[-1]
    assert denied["event"] == "assertion.denied" and denied["decision"] == "deny"
    assert denied["request"]["client_id"] == requested and denied["agent"] == "bot"
    assert not [r for r in audit.records if r["event"] == "assertion.issued"]


def test_no_durable_record_no_answer(tmp_path: Path) -> None:
    issuance, caller = _pipeline(tmp_path, _Audit(fail=True))
    with pytest.raises(AuditError):
        _run(issuance, caller)


@pytest.mark.parametrize(("ids_a", "ids_b", "error"), [
    ('["spiffe://example.org/agent/b"]', "[]", "a SPIFFE ID may only be the agent's own"),
    ('["spiffe://example.org/agent/a/x"]', "[]", "a SPIFFE ID may only be the agent's own"),
    ('["shared"]', '["shared"]', "already belongs to agent 'a'"),
    ('["has space"]', "[]", "printable ASCII"),
    ('"not-a-list"', "[]", "list of non-empty strings"),
])
def test_loader_refuses_client_ids_that_would_borrow(tmp_path: Path, ids_a: str, ids_b: str,
                                                      error: str) -> None:
    from badged.errors import ConfigError

    policy = tmp_path / "p.toml"
    policy.write_text(f"""
[bundle.b]
audiences = ["x"]
kinds = ["assertion"]

[[agent]]
name = "a"
selectors = ["unix:uid:1"]
bundles = ["b"]
client_ids = {ids_a}

[[agent]]
name = "b"
selectors = ["unix:uid:2"]
bundles = ["b"]
client_ids = {ids_b}
""")
    with pytest.raises(ConfigError) as info:
        load_policy(policy)
    assert error in str(info.value) and "p.toml:" in str(info.value)


def test_loader_accepts_own_spiffe_id_and_plain_client_ids(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("""
[bundle.b]
audiences = ["x"]
kinds = ["assertion"]

[[agent]]
name = "a"
selectors = ["unix:uid:1"]
bundles = ["b"]
client_ids = ["spiffe://example.org/agent/a", "a-prod"]
""")
    rule = load_policy(policy).agents[0]
    assert rule.client_ids == frozenset({"spiffe://example.org/agent/a", "a-prod"})


def test_verifier_refuses_an_attestation_naming_another_agent() -> None:
    """A device-signed attestation whose client id is another agent's SPIFFE ID,
    or whose attested key the JWKS names for another agent, is refused."""
    from badgeclient.verify import ClaimsError, UntrustedKeyError, Verifier
    from badged.core import assertions
    from badged.core.jose import ec_public_jwk, jwk_thumbprint
    from tests.credentials.test_verify import AGENT, ISSUER, NOW, Env, Pki

    env = Env()
    pki = Pki(env)
    dev_id = jwk_thumbprint(ec_public_jwk(pki.dev.public_key()))

    def att(client_id: str) -> str:
        return assertions.mint_client_attestation(assertions.client_attestation_claims(
            attester=f"spiffe://example.org/device/{dev_id}", client_id=client_id,
            agent_key=env.agent.public_key(), now=NOW, ttl_seconds=600,
            evidence={"agent": AGENT}), pki.dev, x5c=pki.x5c(pki.device))

    def pop(client_id: str, jti: str) -> str:
        return assertions.mint_attestation_pop(assertions.attestation_pop_claims(
            client_id=client_id, audience="https://as", now=NOW, ttl_seconds=60, jti=jti),
            env.agent)

    v = Verifier(roots=[pki.root], clock=env.clock, issuer=ISSUER)
    victim = "spiffe://example.org/agent/victim"
    with pytest.raises(ClaimsError) as info:
        v.verify_client_attestation(att(victim), pop(victim, "1"), audience="https://as")
    assert info.value.reason == "wrong_subject"
    # Control: its own id, or a plain OAuth client id, passes.
    assert v.verify_client_attestation(att(AGENT), pop(AGENT, "2"),
                                       audience="https://as").agent == AGENT
    assert v.verify_client_attestation(att("c1"), pop("c1", "3"), audience="https://as").agent \
        == AGENT
    # A JWKS that names the attested key as another agent's wins over the claim.
    jwks = {"keys": [{**ec_public_jwk(env.agent.public_key()), "kid": env.kid,
                      "badged_agent": victim}], "badged_issuer": ISSUER}
    named = Verifier(jwks=jwks, roots=[pki.root], clock=env.clock)
    with pytest.raises(UntrustedKeyError) as mismatch:
        named.verify_client_attestation(att("c1"), pop("c1", "4"), audience="https://as")
    assert mismatch.value.reason == "key_agent_mismatch"
