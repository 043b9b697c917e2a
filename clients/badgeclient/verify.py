"""Verify what badged issues, for relying parties: offline, strict, typed.

An API, an OAuth authorization server or a CA uses this module to check a
badged access token, an RFC 7523 client assertion, an OAuth client
attestation + PoP, or a DPoP proof, against keys it already trusts (a JWKS,
or the organization's root certificate). It depends only on ``cryptography``
and the standard library -- not on the daemon, not on a JOSE library -- so a
relying party can vendor it, and badged's own encoder is never used to check
itself.

Every refusal raises a :class:`VerificationError` subclass whose ``reason``
is a stable code (``alg_not_allowed``, ``replayed``, ``htu_mismatch``, ...),
safe to log; the message never contains the credential.

Example::

    from badgeclient.verify import Verifier

    v = Verifier(jwks=jwks_dict)                     # or roots=[root_cert]
    result = v.verify_token(token, audience="https://api.example.com")
    result.agent   # "spiffe://example.org/agent/deploy-bot"
    result.user    # the delegating user if the token carries ``act``

Rules applied everywhere (each is a test in tests/credentials):

* ``alg`` is pinned to ES256; ``none``, HMAC and anything else are refused
  before any key is looked at (no alg confusion); ``crit``, ``jku`` and
  ``x5u`` are refused (nothing is fetched);
* compact JWS only, at most ``max_bytes``; strict, canonical base64url;
  JSON objects without duplicate members;
* the key comes from the trusted JWKS by ``kid``, or from an ``x5c`` chain
  that must verify to a trusted root at the (injected) current time, with
  the leaf's SAN URI equal to the agent's SPIFFE ID; an embedded ``jwk`` is
  trusted only for DPoP proofs, where it *is* the point;
* ``exp`` is required, ``nbf``/``iat`` are honoured, all with a bounded
  skew (at most 5 minutes); lifetimes above ``max_lifetime`` are refused;
* ``jti`` is required and remembered until the credential expires (replay);
* revoked SPIFFE IDs, key ids and certificate serials are refused;
* a device vouches only for the agents its certificate names (name
  constraints, ``device_scope``), for certificates and attestations alike;
* ``min_assurance``: tokens below that level (``assurance`` claim, capped by
  the device certificate's statement when an ``x5c`` chain is checked) are
  refused (``assurance_too_low``);
* a token with ``cnf.jkt`` is accepted only with a valid DPoP proof from
  that key, and a DPoP proof is accepted only with a token bound to it;
* each credential type has its own ``typ`` and is accepted only as itself:
  an access token is ``JWT``/``at+jwt`` and carries the daemon's issuer
  (``issuer=``, or ``badged_issuer`` of the JWKS), a client assertion is
  ``client-authentication+jwt``, so one signed by the same agent key never
  passes for the other;
* every trusted key names its agent (JWKS member ``badged_agent``, or the
  certificate's SAN): the token's ``sub`` (``act.sub`` when delegated) must
  be that agent, so one agent's key cannot speak for another.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import verification as x509v

_logger = logging.getLogger(__name__)

Clock = Callable[[], float]
ES256 = ec.ECDSA(hashes.SHA256())
MAX_SKEW = 300
DEFAULT_SKEW = 30
DEFAULT_MAX_BYTES = 16 * 1024
MAX_CHAIN = 4
MAX_CERT_DER = 8 * 1024
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*$")
_SPIFFE_RE = re.compile(r"^spiffe://[a-z0-9.-]+(/[A-Za-z0-9._-]+)+$")

TOKEN_TYPS = frozenset({"JWT", "at+jwt"})
ASSERTION_TYP = "client-authentication+jwt"
DPOP_TYP = "dpop+jwt"
JWK_AGENT_MEMBER = "badged_agent"
JWKS_ISSUER_MEMBER = "badged_issuer"
ATTESTATION_TYP = "oauth-client-attestation+jwt"
ATTESTATION_POP_TYP = "oauth-client-attestation-pop+jwt"


class StatusCheck(Protocol):
    """What ``Verifier(status=...)`` calls (badgeclient.status.StatusListChecker):
    raise a VerificationError unless the token's status is VALID."""

    def check(self, claims: Mapping[str, Any], now: float | None = None) -> None: ...


# -- errors --------------------------------------------------------------------


class VerificationError(Exception):
    """Base class. ``reason`` is a stable machine-readable code."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


class MalformedError(VerificationError):
    """Not a well-formed compact JWS: oversized, bad base64url, bad JSON."""


class AlgorithmError(VerificationError):
    """``alg``/``typ``/``crit`` not acceptable (none, HS256, confusion)."""


class UntrustedKeyError(VerificationError):
    """No trusted key for this credential (unknown kid, bad jwk, no trust anchor)."""


class SignatureError(VerificationError):
    """The signature does not verify with the trusted key."""


class ChainError(VerificationError):
    """The x5c chain is expired, not yet valid, untrusted, or names someone else."""


class ClaimsError(VerificationError):
    """A claim is missing or wrong: exp, nbf, iat, aud, iss, sub, lifetime."""


class ReplayError(VerificationError):
    """The ``jti`` was already seen while the credential is still valid."""


class RevokedError(VerificationError):
    """The agent, key or certificate is on the revocation list."""


class DpopError(VerificationError):
    """The DPoP proof does not match the request or the token binding."""


# -- replay cache and revocation ---------------------------------------------------


class ReplayCache:
    """Seen ``jti`` values until their credential expires. Thread-safe.

    Bounded: when full of still-valid entries it refuses (fails closed)
    rather than forgetting one that could then be replayed.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._max = max_entries
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, key: str, *, until: float, now: float) -> None:
        with self._lock:
            expiry = self._seen.get(key)
            if expiry is not None and expiry >= now:
                raise ReplayError("replayed", "this jti was already used")
            if len(self._seen) >= self._max:
                self._seen = {k: v for k, v in self._seen.items() if v >= now}
                if len(self._seen) >= self._max:
                    raise ReplayError("replay_cache_full", "too many live credentials to track")
            self._seen[key] = until


@dataclass(frozen=True)
class Revocations:
    """What the relying party no longer accepts."""

    spiffe_ids: frozenset[str] = frozenset()
    key_ids: frozenset[str] = frozenset()
    serials: frozenset[int] = frozenset()

    @classmethod
    def from_crl(cls, crl_data: bytes, issuer: x509.Certificate, *, now: float,
                 base: Revocations | None = None) -> Revocations:
        """Add the serials of a CRL after checking it is current and signed by
        ``issuer`` (the device certificate for agent certificates)."""
        try:
            crl = (x509.load_pem_x509_crl(crl_data) if crl_data.lstrip().startswith(b"-----")
                   else x509.load_der_x509_crl(crl_data))
        except ValueError:
            raise MalformedError("bad_crl", "not a PEM or DER CRL") from None
        pub = issuer.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or crl.issuer != issuer.subject \
                or not crl.is_signature_valid(pub):
            raise SignatureError("bad_crl_signature", "CRL not signed by the given issuer")
        nxt = crl.next_update_utc
        if nxt is not None and nxt.timestamp() < now:
            raise ChainError("stale_crl", "CRL is past its nextUpdate")
        base = base or cls()
        return cls(base.spiffe_ids, base.key_ids,
                   base.serials | frozenset(r.serial_number for r in crl))


# -- results -----------------------------------------------------------------------


@dataclass(frozen=True)
class AttestationSummary:
    """What the device attested about the agent key (from a client attestation)."""

    attester: str
    key_thumbprint: str
    profile: str | None
    hwkey: Mapping[str, Any]
    workload: Mapping[str, Any]


@dataclass(frozen=True)
class VerifiedToken:
    """A verified token or assertion. ``agent`` is always the agent's SPIFFE ID."""

    agent: str
    user: str | None
    issuer: str
    audience: tuple[str, ...]
    scopes: tuple[str, ...]
    jti: str
    expires_at: int
    key_id: str | None
    chain: tuple[x509.Certificate, ...] = ()
    dpop_jkt: str | None = None
    attestation: AttestationSummary | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    # foundation | enterprise | advanced: see token_assurance (tokens only).
    assurance: str = "foundation"

    def __repr__(self) -> str:
        return f"VerifiedToken(agent={self.agent!r}, user={self.user!r}, jti={self.jti!r})"


@dataclass(frozen=True)
class VerifiedDpop:
    jkt: str
    htm: str
    htu: str
    jti: str
    iat: int


@dataclass(frozen=True)
class DpopRequest:
    """The HTTP request a DPoP proof must match."""

    proof: str
    htm: str
    htu: str
    nonce: str | None = None


# -- parsing -----------------------------------------------------------------------


def _b64url(segment: str, what: str) -> bytes:
    if not _B64URL_RE.match(segment) or len(segment) % 4 == 1:
        raise MalformedError("bad_base64", f"{what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise MalformedError("bad_base64", f"{what} is not base64url") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != segment:
        raise MalformedError("bad_base64", f"{what} is not canonical base64url")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise MalformedError("bad_json", f"duplicate member {k[:40]!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise MalformedError("bad_json", f"{name} is not JSON (RFC 8259)")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MalformedError("bad_json", f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise MalformedError("bad_json", f"{what} is not a JSON object")
    return obj


@dataclass(frozen=True)
class _Jws:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _parse(token: str, *, max_bytes: int, typs: Iterable[str | None]) -> _Jws:
    if not isinstance(token, str):
        raise MalformedError("bad_structure", "credential must be a string")
    if len(token) > max_bytes:
        raise MalformedError("oversized", f"credential longer than {max_bytes} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedError("bad_structure", "not a compact JWS (three parts)")
    header = _json_object(_b64url(parts[0], "header"), "header")
    alg = header.get("alg")
    if alg is None or str(alg).lower() == "none":
        raise AlgorithmError("alg_none", "unsigned credentials are refused")
    if alg != "ES256":
        raise AlgorithmError("alg_not_allowed", "only ES256 is accepted")
    for forbidden in ("crit", "jku", "x5u"):
        if forbidden in header:
            raise AlgorithmError("header_not_allowed", f"header {forbidden!r} is not accepted")
    typ = header.get("typ")
    if not (typ is None or isinstance(typ, str)) or typ not in set(typs):
        raise AlgorithmError("wrong_typ", "unexpected typ for this credential")
    claims = _json_object(_b64url(parts[1], "payload"), "payload")
    signature = _b64url(parts[2], "signature")
    return _Jws(header, claims, (parts[0] + "." + parts[1]).encode("ascii"), signature)


def _check_signature(jws: _Jws, key: ec.EllipticCurvePublicKey) -> None:
    if not isinstance(key.curve, ec.SECP256R1):
        raise UntrustedKeyError("bad_key", "ES256 needs a P-256 key")
    sig = jws.signature
    if len(sig) != 64:
        raise SignatureError("bad_signature", "ES256 signatures are 64 bytes")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.verify(der, jws.signing_input, ES256)
    except InvalidSignature:
        raise SignatureError("bad_signature", "signature does not verify") from None


# -- keys --------------------------------------------------------------------------


def _jwk_b64_int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise UntrustedKeyError("bad_jwk", f"jwk member {name} missing")
    raw = _b64url(value, f"jwk.{name}")
    if len(raw) != 32:
        raise UntrustedKeyError("bad_jwk", f"jwk member {name} must be 32 bytes")
    return int.from_bytes(raw, "big")


def public_key_from_jwk(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from a JWK; private members are refused outright."""
    if not isinstance(jwk, Mapping):
        raise UntrustedKeyError("bad_jwk", "jwk must be an object")
    if "d" in jwk:
        raise UntrustedKeyError("bad_jwk", "jwk contains private key material")
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise UntrustedKeyError("bad_jwk", "only EC P-256 keys are accepted")
    try:
        return ec.EllipticCurvePublicNumbers(
            _jwk_b64_int(jwk, "x"), _jwk_b64_int(jwk, "y"), ec.SECP256R1()).public_key()
    except ValueError:
        raise UntrustedKeyError("bad_jwk", "point is not on the curve") from None


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of an EC JWK."""
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    data = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    n = key.public_numbers()

    def enc(i: int) -> str:
        return base64.urlsafe_b64encode(i.to_bytes(32, "big")).rstrip(b"=").decode()

    return {"kty": "EC", "crv": "P-256", "x": enc(n.x), "y": enc(n.y)}


# -- helpers for claims ----------------------------------------------------------


def _num(claims: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise ClaimsError("missing_claim", f"{name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClaimsError("bad_claim", f"{name} must be a number")
    return int(value)


def _str(claims: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        if required:
            raise ClaimsError("missing_claim", f"{name} is required")
        return ""
    return value


def normalize_htu(url: str) -> str:
    """RFC 9449 §4.3 comparison form: no query/fragment, lower-case scheme and
    host, default port dropped, empty path as ``/``."""
    if len(url) > 2048 or not url.isascii():
        raise DpopError("htu_mismatch", "htu is not a usable URI")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        raise DpopError("htu_mismatch", "htu is not a usable URI") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not hostname:
        raise DpopError("htu_mismatch", "htu is not an absolute http(s) URI")
    host = hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise DpopError("htu_mismatch", "htu has a bad port") from None
    default = 443 if scheme == "https" else 80
    netloc = host if port in (None, default) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", "", ""))


def access_token_hash(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode("ascii")).digest()) \
        .rstrip(b"=").decode()


def _spiffe_trust_domain(uri: str) -> str:
    return uri[len("spiffe://"):].split("/", 1)[0]


# -- the verifier ------------------------------------------------------------------


class Verifier:
    """Checks badged credentials against trust anchors the caller supplies.

    ``jwks``: a JWK Set (``{"keys": [...]}``) of keys trusted by ``kid``.
    ``roots``: root certificates trusted for ``x5c`` chains.
    ``clock``: seconds since the epoch; injected so tests and replays can
    move time. ``skew``: leeway for exp/nbf/iat, at most 300 s.
    ``issuer``: the daemon's ``iss`` for access tokens; by default the JWKS's
    ``badged_issuer`` member (``badgectl jwks`` writes it). Access tokens
    are refused when neither is known.
    ``single_use_tokens``: remember access-token ``jti`` values and refuse a
    second use (the default); ``False`` accepts a token until ``exp``, for
    clients that cache tokens (``badgeclient.TokenSource``).
    ``status``: check the token's ``status`` claim against the daemon's Token
    Status List (``badgeclient.status.StatusListChecker``).
    """

    def __init__(self, *, jwks: Mapping[str, Any] | None = None,
                 roots: Sequence[x509.Certificate] = (), clock: Clock = time.time,
                 skew: int = DEFAULT_SKEW, max_lifetime: int = 24 * 3600,
                 max_bytes: int = DEFAULT_MAX_BYTES, replay_cache: ReplayCache | None = None,
                 revocations: Revocations | None = None, dpop_max_age: int = 60,
                 hardware_keys: Mapping[str, ec.EllipticCurvePublicKey] | None = None,
                 issuer: str | None = None, min_assurance: str | None = None,
                 single_use_tokens: bool = True, status: StatusCheck | None = None) -> None:
        if not 0 <= skew <= MAX_SKEW:
            raise ValueError(f"skew must be 0..{MAX_SKEW} seconds")
        if min_assurance is not None and min_assurance not in ASSURANCE_LEVELS:
            raise ValueError(f"min_assurance must be one of {', '.join(ASSURANCE_LEVELS)}")
        # Tokens below this level are refused (assurance_too_low).
        self._min_assurance = min_assurance
        # Session-mode keys (JWKS entries carrying a certification) are only
        # accepted with their chain to a hardware key checked; ``hardware_keys``
        # pins those keys (thumbprint -> key) instead of trusting the JWKS.
        self._jwks_doc: Mapping[str, Any] = jwks or {}
        self._session_kids = {str(k.get("kid")) for k in self._jwks_doc.get("keys", [])
                              if isinstance(k, Mapping) and "badged_cert" in k}
        self._hardware_keys = hardware_keys
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        # kid -> the SPIFFE ID of the agent that key belongs to, as the JWKS says.
        self._key_agents: dict[str, str] = {}
        for jwk in (jwks or {}).get("keys", []):
            kid = jwk.get("kid") if isinstance(jwk, Mapping) else None
            if isinstance(kid, str) and jwk.get("kty") == "EC":
                self._keys[kid] = public_key_from_jwk(jwk)
                named = jwk.get(JWK_AGENT_MEMBER)
                if isinstance(named, str) and _SPIFFE_RE.match(named):
                    self._key_agents[kid] = named
        doc_issuer = self._jwks_doc.get(JWKS_ISSUER_MEMBER)
        self._issuer = issuer if issuer is not None else (
            doc_issuer if isinstance(doc_issuer, str) and doc_issuer else None)
        self._roots = list(roots)
        self._clock = clock
        self._skew = skew
        self._max_lifetime = max_lifetime
        self._max_bytes = max_bytes
        self._replay = replay_cache if replay_cache is not None else ReplayCache()
        self.revocations = revocations or Revocations()
        self._dpop_max_age = dpop_max_age
        # False for a resource server whose clients cache tokens (TokenSource):
        # an access token is then good until exp, and replay of a *stolen* one
        # is what DPoP binding (whose proofs stay single-use) prevents.
        self._single_use_tokens = single_use_tokens
        # Token Status List (badgeclient.status): revocation within its max_age.
        self._status = status

    # -- public API ----------------------------------------------------------------

    def verify_token(self, token: str, *, audience: str, issuer: str | None = None,
                     dpop: DpopRequest | None = None, require_dpop: bool = False) -> VerifiedToken:
        """A badged access token (``typ`` JWT), optionally DPoP-bound.

        ``issuer`` overrides the Verifier's; one of them must be known.
        ``dpop``: the proof presented with the token -- it requires a token
        bound to its key (``cnf.jkt``). ``require_dpop`` refuses unbound tokens.
        """
        now = self._clock()
        jws = _parse(token, max_bytes=self._max_bytes, typs=TOKEN_TYPS)
        expected_iss = issuer if issuer is not None else self._issuer
        if expected_iss is None:
            raise ClaimsError("issuer_unknown",
                              "no expected issuer (pass issuer= or a JWKS with badged_issuer)")
        key, kid, chain = self._resolve_key(jws, now)
        _check_signature(jws, key)
        c = jws.claims
        self._check_times(c, now)
        self._check_audience(c, audience)
        iss = _str(c, "iss")
        if iss != expected_iss:
            raise ClaimsError("wrong_issuer", "unexpected iss")
        agent, user = self._subjects(c)
        self._check_chain_names(chain, agent)
        self._check_key_agent(kid, chain, agent)
        self._check_session_chain(token, kid, agent, now)
        self._check_revoked(agent, kid, chain)
        if self._status is not None:
            self._status.check(c, now)
        jkt = self._check_binding(c, token, dpop, require_dpop, now)
        level = token_assurance(c, chain)
        if self._min_assurance is not None and \
                ASSURANCE_LEVELS.index(level) < ASSURANCE_LEVELS.index(self._min_assurance):
            raise ClaimsError("assurance_too_low",
                              f"agent assurance {level} is below {self._min_assurance}")
        jti = _str(c, "jti")
        if self._single_use_tokens:
            self._replay.check_and_add(f"tok\x00{iss}\x00{jti}",
                                       until=float(c["exp"]) + self._skew, now=now)
        scope = c.get("scope")
        return VerifiedToken(
            agent=agent, user=user, issuer=iss, audience=self._aud_tuple(c),
            scopes=tuple(scope.split()) if isinstance(scope, str) else (), jti=jti,
            expires_at=int(c["exp"]), key_id=kid, chain=tuple(chain), dpop_jkt=jkt, claims=c,
            assurance=level)

    def verify_client_assertion(self, assertion: str, *, audience: str,
                                client_id: str | None = None) -> VerifiedToken:
        """An RFC 7523 client assertion: ``iss`` = ``sub`` = client id, for ``audience``.

        ``agent`` in the result is the agent the signing key belongs to (JWKS
        ``badged_agent`` or the certificate SAN); a SPIFFE client id must be
        that agent.
        """
        now = self._clock()
        jws = _parse(assertion, max_bytes=self._max_bytes, typs=(ASSERTION_TYP,))
        key, kid, chain = self._resolve_key(jws, now)
        _check_signature(jws, key)
        c = jws.claims
        self._check_times(c, now)
        self._check_audience(c, audience)
        iss, sub = _str(c, "iss"), _str(c, "sub")
        if iss != sub:
            raise ClaimsError("iss_sub_mismatch", "iss and sub must both be the client id")
        if client_id is not None and sub != client_id:
            raise ClaimsError("wrong_subject", "unexpected client id")
        if chain:
            agent = self._leaf_spiffe_id(chain[0])
            if sub.startswith("spiffe://") and sub != agent:
                raise ChainError("san_mismatch", "client id names another SPIFFE ID than the certificate")
        else:
            agent = self._named_agent(kid)
            if sub.startswith("spiffe://") and sub != agent:
                raise UntrustedKeyError("key_agent_mismatch",
                                        "client id names another agent than the signing key's")
        self._check_revoked(agent, kid, chain)
        jti = _str(c, "jti")
        self._replay.check_and_add(f"ca\x00{iss}\x00{jti}",
                                   until=float(c["exp"]) + self._skew, now=now)
        return VerifiedToken(agent=agent, user=None, issuer=iss, audience=self._aud_tuple(c),
                             scopes=(), jti=jti, expires_at=int(c["exp"]), key_id=kid,
                             chain=tuple(chain), claims=c)

    def verify_client_attestation(self, attestation: str, pop: str, *, audience: str,
                                  challenge: str | None = None) -> VerifiedToken:
        """draft-ietf-oauth-attestation-based-client-auth: the attestation (by
        the device key, trusted via JWKS or x5c) and its PoP (by ``cnf.jwk``)."""
        now = self._clock()
        att = _parse(attestation, max_bytes=self._max_bytes, typs=(ATTESTATION_TYP,))
        key, kid, chain = self._resolve_key(att, now, allow_ca_leaf=True)
        _check_signature(att, key)
        a = att.claims
        self._check_times(a, now)
        client_id, attester = _str(a, "sub"), _str(a, "iss")
        cnf = a.get("cnf")
        jwk = cnf.get("jwk") if isinstance(cnf, Mapping) else None
        if not isinstance(jwk, Mapping):
            raise ClaimsError("missing_claim", "cnf.jwk is required")
        agent_key = public_key_from_jwk(jwk)
        # badged names its attester after its key (spiffe://TD/device/<thumbprint>):
        # an agent key that a relying party also trusts can never pose as a device.
        if not attester.endswith("/device/" + jwk_thumbprint(_public_jwk(key))):
            raise ClaimsError("wrong_issuer", "attestation not signed by the device it names")
        p = _parse(pop, max_bytes=self._max_bytes, typs=(ATTESTATION_POP_TYP,))
        _check_signature(p, agent_key)
        pc = p.claims
        self._check_times(pc, now)
        self._check_audience(pc, audience)
        if pc.get("iss", client_id) != client_id:
            raise ClaimsError("wrong_subject", "PoP iss is not the attested client")
        if challenge is not None and pc.get("challenge") != challenge:
            raise ClaimsError("challenge_mismatch", "PoP does not carry the server's challenge")
        thumb = jwk_thumbprint(jwk)
        agent = client_id
        spiffe = a.get("agent")
        if isinstance(spiffe, str) and _SPIFFE_RE.match(spiffe):
            agent = spiffe
        if client_id.startswith("spiffe://") and client_id != agent:
            raise ClaimsError("wrong_subject", "attested client id names another agent")
        named = self._key_agents.get(thumb)
        if named is not None and named != agent:
            raise UntrustedKeyError("key_agent_mismatch",
                                    "attested key belongs to another agent")
        if agent.startswith("spiffe://"):
            # A device attests only for agents of its own trust domain.
            if not attester.startswith("spiffe://") or \
                    _spiffe_trust_domain(attester) != _spiffe_trust_domain(agent):
                raise ChainError("san_mismatch", "device attests for another trust domain")
            if chain:
                self._check_same_trust_domain(chain[0], agent)
                _check_device_scope(chain[0], agent)
        self._check_revoked(agent, thumb, chain)
        if kid is not None and kid in self.revocations.key_ids:
            raise RevokedError("revoked", "the attesting device key is revoked")
        jti = _str(pc, "jti")
        self._replay.check_and_add(f"pop\x00{client_id}\x00{jti}",
                                   until=float(pc["exp"]) + self._skew, now=now)
        summary = AttestationSummary(
            attester=attester, key_thumbprint=thumb,
            profile=a.get("eat_profile") if isinstance(a.get("eat_profile"), str) else None,
            hwkey=dict(a["hwkey"]) if isinstance(a.get("hwkey"), Mapping) else {},
            workload=dict(a["workload"]) if isinstance(a.get("workload"), Mapping) else {})
        return VerifiedToken(agent=agent, user=None, issuer=attester,
                             audience=self._aud_tuple(pc), scopes=(), jti=jti,
                             expires_at=int(pc["exp"]), key_id=thumb, chain=tuple(chain),
                             attestation=summary, claims=a)

    def verify_dpop(self, proof: str, *, htm: str, htu: str, access_token: str | None = None,
                    nonce: str | None = None, jkt: str | None = None) -> VerifiedDpop:
        """An RFC 9449 proof for this request (§4.3 checks, in order)."""
        now = self._clock()
        jws = _parse(proof, max_bytes=self._max_bytes, typs=(DPOP_TYP,))
        jwk = jws.header.get("jwk")
        if not isinstance(jwk, Mapping):
            raise UntrustedKeyError("bad_jwk", "DPoP proofs carry their public key in jwk")
        key = public_key_from_jwk(jwk)
        _check_signature(jws, key)
        c = jws.claims
        if c.get("htm") != htm:
            raise DpopError("htm_mismatch", "proof is for another HTTP method")
        claim_htu = c.get("htu")
        if not isinstance(claim_htu, str) or normalize_htu(claim_htu) != normalize_htu(htu):
            raise DpopError("htu_mismatch", "proof is for another URI")
        iat = _num(c, "iat", required=True)
        assert iat is not None
        if iat > now + self._skew or iat < now - self._dpop_max_age - self._skew:
            raise DpopError("iat_window", "proof is too old or from the future")
        if access_token is not None and c.get("ath") != access_token_hash(access_token):
            raise DpopError("ath_mismatch", "proof is for another access token")
        if nonce is not None and c.get("nonce") != nonce:
            raise DpopError("nonce_mismatch", "proof lacks the server's current nonce")
        thumb = jwk_thumbprint(jwk)
        if jkt is not None and thumb != jkt:
            raise DpopError("jkt_mismatch", "proof key is not the key the token is bound to")
        jti = _str(c, "jti")
        if len(jti) > 256:
            raise ClaimsError("bad_claim", "jti too long")
        self._replay.check_and_add(f"dpop\x00{thumb}\x00{jti}",
                                   until=iat + self._dpop_max_age + 2 * self._skew, now=now)
        return VerifiedDpop(jkt=thumb, htm=htm, htu=normalize_htu(claim_htu), jti=jti, iat=iat)

    # -- internals ------------------------------------------------------------------

    def _resolve_key(self, jws: _Jws, now: float, *, allow_ca_leaf: bool = False
                     ) -> tuple[ec.EllipticCurvePublicKey, str | None, list[x509.Certificate]]:
        h = jws.header
        if "jwk" in h:
            raise AlgorithmError("header_not_allowed", "an embedded jwk is not a trust anchor")
        kid = h.get("kid") if isinstance(h.get("kid"), str) else None
        if "x5c" in h and self._roots:
            chain = self._verify_chain(h["x5c"], now, allow_ca_leaf=allow_ca_leaf)
            pub = chain[0].public_key()
            if not isinstance(pub, ec.EllipticCurvePublicKey):
                raise UntrustedKeyError("bad_key", "leaf key is not EC")
            return pub, kid, chain
        if kid is not None and kid in self._keys:
            return self._keys[kid], kid, []
        if kid is None:
            raise UntrustedKeyError("no_key", "no kid and no trusted x5c")
        raise UntrustedKeyError("unknown_kid", "kid not in the trusted key set")

    def _verify_chain(self, x5c: Any, now: float, *, allow_ca_leaf: bool
                      ) -> list[x509.Certificate]:
        if not isinstance(x5c, list) or not x5c or len(x5c) > MAX_CHAIN:
            raise ChainError("bad_chain", f"x5c must be a list of 1..{MAX_CHAIN} certificates")
        certs: list[x509.Certificate] = []
        for entry in x5c:
            if not isinstance(entry, str) or len(entry) > MAX_CERT_DER * 2:
                raise ChainError("bad_chain", "x5c entries must be base64 DER")
            try:
                certs.append(x509.load_der_x509_certificate(base64.b64decode(entry, validate=True)))
            except (binascii.Error, ValueError):
                raise MalformedError("bad_base64", "x5c entry is not base64 DER") from None
        for cert in certs:
            if cert.not_valid_after_utc.timestamp() < now:
                raise ChainError("chain_expired", "a certificate in the chain has expired")
            if cert.not_valid_before_utc.timestamp() > now:
                raise ChainError("chain_not_yet_valid", "a certificate in the chain is not yet valid")
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        if allow_ca_leaf:
            # A client attestation is signed by the device key, whose
            # certificate is a CA; path validators refuse CA leaves, so walk
            # the (short) chain by signatures and CA flags ourselves.
            return self._verify_ca_leaf(certs)
        try:
            verifier = x509v.PolicyBuilder().store(x509v.Store(self._roots)).time(when) \
                .max_chain_depth(MAX_CHAIN).build_client_verifier()
            verified = verifier.verify(certs[0], certs[1:])
        except x509v.VerificationError:
            raise ChainError("chain_untrusted", "chain does not verify to a trusted root") from None
        return [verified.chain[0], *certs[1:]]

    def _verify_ca_leaf(self, certs: list[x509.Certificate]) -> list[x509.Certificate]:
        path = list(certs)
        for child, parent in itertools.pairwise(path):
            self._issued_by(child, parent)
        top = path[-1]
        for root in self._roots:
            if top == root:
                return certs
            try:
                self._issued_by(top, root)
            except ChainError:
                continue
            return certs
        raise ChainError("chain_untrusted", "chain does not verify to a trusted root")

    @staticmethod
    def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
        try:
            bc = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise ChainError("chain_untrusted", "issuer is not a CA") from None
        if not bc.ca:
            raise ChainError("chain_untrusted", "issuer is not a CA")
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise ChainError("chain_untrusted", "certificate not issued by the next one") from None

    @staticmethod
    def _leaf_spiffe_id(leaf: x509.Certificate) -> str:
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise ChainError("san_mismatch", "leaf has no SAN") from None
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                if u.startswith("spiffe://")]
        if len(uris) != 1:
            raise ChainError("san_mismatch", "leaf must carry exactly one SPIFFE ID")
        return uris[0]

    def _check_same_trust_domain(self, leaf: x509.Certificate, agent: str) -> None:
        device = self._leaf_spiffe_id(leaf)
        if _spiffe_trust_domain(device) != _spiffe_trust_domain(agent):
            raise ChainError("san_mismatch", "device attests for another trust domain")

    def _check_chain_names(self, chain: list[x509.Certificate], agent: str) -> None:
        if not chain:
            return
        if self._leaf_spiffe_id(chain[0]) != agent:
            raise ChainError("san_mismatch", "certificate SAN is not the token's agent")
        if len(chain) > 1:
            self._check_same_trust_domain(chain[1], agent)
            _check_device_scope(chain[1], agent, leaf=chain[0])

    def _check_times(self, c: Mapping[str, Any], now: float) -> None:
        exp = _num(c, "exp", required=True)
        nbf = _num(c, "nbf", required=False)
        iat = _num(c, "iat", required=False)
        assert exp is not None
        if now > exp + self._skew:
            raise ClaimsError("expired", "credential has expired")
        if nbf is not None and now + self._skew < nbf:
            raise ClaimsError("not_yet_valid", "credential is not valid yet")
        if iat is not None and iat > now + self._skew:
            raise ClaimsError("iat_in_future", "credential issued in the future")
        start = iat if iat is not None else (nbf if nbf is not None else now)
        if exp - start > self._max_lifetime:
            raise ClaimsError("lifetime_too_long", "credential lives longer than allowed")

    @staticmethod
    def _aud_tuple(c: Mapping[str, Any]) -> tuple[str, ...]:
        aud = c.get("aud")
        if isinstance(aud, str):
            return (aud,)
        if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            return tuple(aud)
        return ()

    def _check_audience(self, c: Mapping[str, Any], audience: str) -> None:
        auds = self._aud_tuple(c)
        if not auds:
            raise ClaimsError("missing_claim", "aud is required")
        if audience not in auds:
            raise ClaimsError("wrong_audience", "credential is for another audience")

    def _check_session_chain(self, token: str, kid: str | None, agent: str, now: float) -> None:
        """A session key signs only within its certification, for its agent."""
        if kid is None or kid not in self._session_kids:
            return
        from badgeclient.session_verify import SessionChainError, verify_session_chain

        try:
            chain = verify_session_chain(token, self._jwks_doc, now=now,
                                         hardware_keys=self._hardware_keys, leeway=self._skew)
        except SessionChainError as exc:
            raise UntrustedKeyError("session_chain", f"session key chain: {exc.reason}") from None
        if chain.agent != agent:
            raise UntrustedKeyError("session_chain", "session key certified for another agent")

    def _named_agent(self, kid: str | None) -> str:
        """The agent a JWKS key belongs to; a key that names none is not trusted
        to speak for any agent."""
        named = self._key_agents.get(kid) if kid is not None else None
        if named is None:
            raise UntrustedKeyError("key_not_named", "the trusted key does not name its agent")
        return named

    def _check_key_agent(self, kid: str | None, chain: Sequence[x509.Certificate],
                         agent: str) -> None:
        """The token speaks for the agent whose key signed it, and no other."""
        if chain:
            return  # _check_chain_names: the certificate SAN is the agent
        if self._named_agent(kid) != agent:
            raise UntrustedKeyError("key_agent_mismatch",
                                    "token names another agent than the key that signed it")

    @staticmethod
    def _subjects(c: Mapping[str, Any]) -> tuple[str, str | None]:
        sub = _str(c, "sub")
        act = c.get("act")
        if act is None:
            agent, user = sub, None
        else:
            if not isinstance(act, Mapping) or not isinstance(act.get("sub"), str):
                raise ClaimsError("bad_claim", "act must be an object with sub")
            agent, user = str(act["sub"]), sub
        if not _SPIFFE_RE.match(agent):
            raise ClaimsError("bad_subject", "agent is not a SPIFFE ID")
        return agent, user

    def _check_revoked(self, agent: str, kid: str | None, chain: Sequence[x509.Certificate]) -> None:
        r = self.revocations
        if agent in r.spiffe_ids:
            raise RevokedError("revoked", "agent is revoked")
        if kid is not None and kid in r.key_ids:
            raise RevokedError("revoked", "key is revoked")
        for cert in chain:
            if cert.serial_number in r.serials:
                raise RevokedError("revoked", "certificate is revoked")

    def _check_binding(self, c: Mapping[str, Any], token: str, dpop: DpopRequest | None,
                       require_dpop: bool, now: float) -> str | None:
        cnf = c.get("cnf")
        jkt = cnf.get("jkt") if isinstance(cnf, Mapping) else None
        if jkt is None:
            if require_dpop:
                raise DpopError("token_not_bound", "token is not DPoP-bound")
            if dpop is not None:
                # A proof says "this request uses a DPoP-bound token": a bearer
                # token under it would be taken as proven when it is not.
                raise DpopError("token_not_bound", "a DPoP proof came with an unbound token")
            return None
        if not isinstance(jkt, str):
            raise ClaimsError("bad_claim", "cnf.jkt must be a string")
        if dpop is None:
            raise DpopError("missing_proof", "DPoP-bound token presented without a proof")
        self.verify_dpop(dpop.proof, htm=dpop.htm, htu=dpop.htu, access_token=token,
                         nonce=dpop.nonce, jkt=jkt)
        return jkt


AGENT_ORG = "badged agent"
ASSURANCE_LEVELS = ("foundation", "enterprise", "advanced")
# The operator CA's statement of what it verified about a device key
# (badged.core.x509.DEVICE_ATTESTATION_OID; canonical JSON with "evidence").
DEVICE_ATTESTATION_OID = x509.ObjectIdentifier("2.25.54195680950305630700219462399422570192")


def device_evidence(device_cert: x509.Certificate) -> str:
    """``tpm2-activated-ak``, ``token-statement`` or "" (no statement)."""
    try:
        ext = device_cert.extensions.get_extension_for_oid(DEVICE_ATTESTATION_OID).value
    except x509.ExtensionNotFound:
        return ""
    if not isinstance(ext, x509.UnrecognizedExtension):
        return ""
    try:
        doc = json.loads(ext.value)
    except ValueError:
        return ""
    return str(doc.get("evidence", "")) if isinstance(doc, dict) else ""


def token_assurance(claims: Mapping[str, Any], chain: Sequence[x509.Certificate]) -> str:
    """The assurance level a verified token establishes.

    The daemon computes the level from verified facts and signs it into the
    ``assurance`` claim; a relying party that trusts the daemon's JWKS takes
    it from there. With an ``x5c`` chain verified to the org root the
    relying party checks the facts itself and the claim is capped by them:
    ``advanced`` only if the device certificate carries the CA's
    ``tpm2-activated-ak`` statement, else ``enterprise``. A missing or
    unknown claim is ``foundation`` (a badged key is always a token key).
    """
    claimed = claims.get("assurance")
    level = claimed if isinstance(claimed, str) and claimed in ASSURANCE_LEVELS \
        else ASSURANCE_LEVELS[0]
    if len(chain) > 1:
        cap = "advanced" if device_evidence(chain[1]) == "tpm2-activated-ak" else "enterprise"
        if ASSURANCE_LEVELS.index(level) > ASSURANCE_LEVELS.index(cap):
            level = cap
    return level


def permitted_agents(device_cert: x509.Certificate) -> frozenset[str] | None:
    """Agent names a device certificate's name constraints permit; None = no constraints.

    badged's CA writes them as directoryName subtrees ``O=badged agent,
    CN=<name>`` (openssl enforces those on the agent certificate's subject).
    A constraint of any other shape permits nothing here: fail closed.
    """
    try:
        nc = device_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    out: set[str] = set()
    for sub in nc.permitted_subtrees or ():
        if not isinstance(sub, x509.DirectoryName):
            continue
        attrs = [list(rdn) for rdn in sub.value.rdns]
        if [len(a) for a in attrs] != [1, 1]:
            continue
        o, cn = attrs[0][0], attrs[1][0]
        if o.oid == x509.NameOID.ORGANIZATION_NAME and o.value == AGENT_ORG \
                and cn.oid == x509.NameOID.COMMON_NAME and isinstance(cn.value, str):
            out.add(cn.value)
    return frozenset(out)


def _check_device_scope(device_cert: x509.Certificate, agent: str, *,
                        leaf: x509.Certificate | None = None) -> None:
    """A device vouches only for the agents its certificate names.

    The same rule openssl applies to the leaf's subject, applied here to the
    SPIFFE ID a relying party acts on (``spiffe://TD/agent/<name>``), plus:
    the leaf's subject must be that very agent, so a subject that satisfies
    openssl cannot carry another agent's SAN.
    """
    permitted = permitted_agents(device_cert)
    if permitted is None:
        return
    path = agent.split("/", 3)[3] if agent.count("/") >= 3 else ""
    name = path[len("agent/"):] if path.startswith("agent/") else ""
    if not name or "/" in name or name not in permitted:
        raise ChainError("device_scope", "the issuing device was not enrolled for this agent")
    if leaf is not None:
        expected = x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, AGENT_ORG),
                              x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
        if leaf.subject != expected:
            raise ChainError("device_scope", "certificate subject is not the agent of its SAN")


def load_roots(pem: bytes) -> list[x509.Certificate]:
    """Trusted roots from a PEM bundle."""
    return list(x509.load_pem_x509_certificates(pem))


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The JWK form of a P-256 public key (for building a trusted JWKS)."""
    return _public_jwk(key)


def spki_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
