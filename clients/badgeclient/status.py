"""Token Status List checks for relying parties (draft-ietf-oauth-status-list).

badged puts ``status: {status_list: {idx, uri}}`` in every access token and
publishes a signed Status List Token (``typ: statuslist+jwt``, signed by the
daemon's *device key*): bit ``idx`` set means the token was revoked -- its
agent, the step-up grant it was issued under, or the delegation it acts
for. A relying party that checks the list learns of a revocation within
``max_age`` seconds instead of when the token expires.

Usage::

    from badgeclient.status import StatusListChecker, socket_fetcher
    from badgeclient.verify import Verifier

    status = StatusListChecker(fetch=socket_fetcher("/run/badged/agent.sock"),
                               keys=device_jwks, max_age=30)
    v = Verifier(jwks=jwks, status=status)
    v.verify_token(token, audience="https://api")   # RevokedError("status_revoked")

``device_jwks`` is the device key from ``badgectl trust-bundle --jwks``, pinned
out of band like the JWKS -- never taken from the list itself.

Fail closed: a token without a ``status`` claim is refused
(``status_missing``) unless ``require=False``; a list that cannot be fetched,
does not verify or is older than ``max_age`` (by our clock, since we fetched
it) or past its ``exp`` is refused (``status_unavailable``), so a relying
party cut off from the daemon does not silently fall back to accepting
revoked tokens. ``max_age`` is the bound on how stale an answer can be.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from badgeclient.verify import (
    ClaimsError,
    RevokedError,
    VerificationError,
    _b64url,
    _check_signature,
    _parse,
    jwk_thumbprint,
    public_key_from_jwk,
)

STATUS_LIST_TYP = "statuslist+jwt"
# A compressed list larger than this, or one that inflates beyond
# MAX_LIST_BYTES, is refused before it costs memory (zip bomb).
MAX_TOKEN_BYTES = 512 * 1024
MAX_LIST_BYTES = 1 << 21  # 16 Mi entries at 1 bit
MAX_AGE_CAP = 24 * 3600

Fetch = Callable[[str], str]


def socket_fetcher(socket_path: str | Path) -> Fetch:
    """Fetch the list from a badged workload socket (``GetStatusList``)."""

    def fetch(uri: str) -> str:
        from badgeclient.client import WorkloadClient

        with WorkloadClient(socket_path, timeout=10.0) as w:
            jwt, _ = w.status_list()
        return jwt

    return fetch


def file_fetcher(path: str | Path) -> Fetch:
    """Read the list from a file (``badgectl status-list export``), re-read on refresh."""

    def fetch(uri: str) -> str:
        return Path(path).read_text().strip()

    return fetch


class _Cached:
    """One verified list: its bits and when (monotonic) it was fetched."""

    def __init__(self, bits: int, lst: bytes, fetched: float, exp: float | None) -> None:
        self.bits = bits
        self.size = len(lst)
        self.fetched = fetched
        self.exp = exp
        self._lst = lst

    def status(self, idx: int) -> int:
        per_byte = 8 // self.bits
        byte, slot = divmod(idx, per_byte)
        if byte >= self.size:
            raise ClaimsError("status_index", "status index outside the list")
        return (self._lst[byte] >> (slot * self.bits)) & ((1 << self.bits) - 1)


class StatusListChecker:
    """Checks a token's ``status`` claim against a cached, verified status list.

    ``fetch(uri) -> status list JWT``: how to get the list the token names.
    ``keys``: a JWK Set (or one JWK) of the device key(s) that sign lists.
    ``uri``: if given, tokens must name exactly this list (else any uri is
    fetched through ``fetch``, at most ``max_lists`` of them cached).
    ``max_age``: seconds a fetched list is used; the staleness bound.
    ``max_iat_age``: also refuse a list *signed* longer ago than this (wall
    clock, against its ``iat``): the staleness bound for a list read from a
    file, which may have been exported long before it is fetched. Not needed
    for the daemon's socket: the daemon re-signs whenever a bit changes, so
    the list it serves is current whatever its ``iat``.
    """

    def __init__(self, *, fetch: Fetch, keys: Mapping[str, Any], uri: str | None = None,
                 max_age: float = 60.0, require: bool = True, skew: int = 30,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, max_lists: int = 8,
                 max_iat_age: float | None = None) -> None:
        if not 0 < max_age <= MAX_AGE_CAP:
            raise ValueError(f"max_age must be in (0, {MAX_AGE_CAP}] seconds")
        if max_iat_age is not None and not 0 < max_iat_age <= MAX_AGE_CAP:
            raise ValueError(f"max_iat_age must be in (0, {MAX_AGE_CAP}] seconds")
        self._max_iat_age = max_iat_age
        self._fetch = fetch
        self._uri = uri
        self.max_age = max_age
        self._require = require
        self._skew = skew
        self._clock = clock
        self._mono = monotonic
        self._max_lists = max_lists
        jwks = keys.get("keys") if "keys" in keys else [keys]
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for jwk in jwks if isinstance(jwks, list) else []:
            if isinstance(jwk, Mapping) and jwk.get("kty") == "EC":
                self._keys[str(jwk.get("kid") or jwk_thumbprint(jwk))] = public_key_from_jwk(jwk)
        if not self._keys:
            raise ValueError("keys: no EC key to verify status lists with")
        self._lock = threading.Lock()
        self._cache: dict[str, _Cached] = {}
        self.fetches = 0  # how many lists were fetched (for tests and metrics)

    def check(self, claims: Mapping[str, Any], now: float | None = None) -> None:
        """Raise unless the token's status is VALID (0) in a fresh enough list."""
        ref = claims.get("status")
        if ref is None:
            if self._require:
                raise ClaimsError("status_missing", "token has no status claim")
            return
        sl = ref.get("status_list") if isinstance(ref, Mapping) else None
        idx = sl.get("idx") if isinstance(sl, Mapping) else None
        uri = sl.get("uri") if isinstance(sl, Mapping) else None
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0 \
                or not isinstance(uri, str) or not uri:
            raise ClaimsError("status_malformed", "status claim is not {status_list: {idx, uri}}")
        if self._uri is not None and uri != self._uri:
            raise ClaimsError("status_uri", "token names another status list")
        value = self._list(uri).status(idx)
        if value != 0:
            raise RevokedError("status_revoked", "the token's status is not VALID")

    def _list(self, uri: str) -> _Cached:
        mono = self._mono()
        with self._lock:
            cached = self._cache.get(uri)
            if cached is not None and mono - cached.fetched < self.max_age and \
                    (cached.exp is None or cached.exp + self._skew > self._clock()):
                return cached
        fresh = self._load(uri)
        with self._lock:
            if uri not in self._cache and len(self._cache) >= self._max_lists:
                self._cache.pop(next(iter(self._cache)))
            self._cache[uri] = fresh
        return fresh

    def refresh(self, uri: str) -> None:
        """Fetch now (e.g. from a background poller)."""
        fresh = self._load(uri)
        with self._lock:
            self._cache[uri] = fresh

    def _load(self, uri: str) -> _Cached:
        fetched = self._mono()
        try:
            token = self._fetch(uri)
        except Exception as exc:  # any transport failure: fail closed
            raise VerificationError("status_unavailable",
                                    f"status list could not be fetched: {type(exc).__name__}"
                                    ) from None
        self.fetches += 1
        try:
            return self._verify(token, uri, fetched)
        except VerificationError as exc:
            raise VerificationError("status_unavailable",
                                    f"status list refused: {exc.reason}") from None

    def _verify(self, token: str, uri: str, fetched: float) -> _Cached:
        jws = _parse(token, max_bytes=MAX_TOKEN_BYTES, typs=(STATUS_LIST_TYP,))
        kid = jws.header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise VerificationError("untrusted_key", "status list signed by an unknown key")
        _check_signature(jws, key)
        c = jws.claims
        if c.get("sub") != uri:
            raise ClaimsError("status_uri", "status list sub is not the token's uri")
        now = self._clock()
        iat, exp = c.get("iat"), c.get("exp")
        if not isinstance(iat, int) or iat > now + self._skew:
            raise ClaimsError("bad_iat", "status list iat missing or in the future")
        if self._max_iat_age is not None and now - iat > self._max_iat_age:
            raise ClaimsError("status_stale",
                              f"status list signed {now - iat:.0f}s ago, over the max age")
        if exp is not None and (not isinstance(exp, int) or exp + self._skew <= now):
            raise ClaimsError("expired", "status list expired")
        sl = c.get("status_list")
        bits = sl.get("bits") if isinstance(sl, Mapping) else None
        lst = sl.get("lst") if isinstance(sl, Mapping) else None
        if bits not in (1, 2, 4, 8) or not isinstance(lst, str):
            raise ClaimsError("status_malformed", "status_list needs bits 1/2/4/8 and lst")
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(_b64url(lst, "lst"), MAX_LIST_BYTES)
        except zlib.error:
            raise ClaimsError("status_malformed", "lst is not ZLIB data") from None
        if inflater.unconsumed_tail:
            raise ClaimsError("status_malformed", "status list larger than the bound")
        return _Cached(int(bits), raw, fetched, float(exp) if exp is not None else None)
