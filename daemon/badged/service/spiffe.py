"""The SPIFFE Workload API on badged's workload socket (JWT-SVID profile).

Stock SPIFFE clients (py-spiffe ``WorkloadApiClient``/``JwtSource``,
go-spiffe, java-spiffe) get JWT-SVIDs for the agent identity the caller is
bound to, the trust bundle, and validation -- through exactly the same
attestation, policy (kind ``token``), key store and audit as ``FetchToken``.
A JWT-SVID *is* a badged access token: ``sub`` = the agent's SPIFFE ID.

X.509-SVIDs are deliberately not served (the RPCs answer UNIMPLEMENTED): the
SPIFFE X.509 profile hands the workload its private key, and badged exists
so that agents never hold one. Agents that need X.509 get a certificate for
their hardware-held key from an enrolled device (``badgectl cert``) and sign
through badged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import struct_pb2

from badged.core.jose import public_key_from_jwk
from badged.core.jws_verify import verify_es256
from badged.core.tokens import ACCESS_TOKEN_TYPS, JWK_AGENT_MEMBER, IssuedToken, build_claims, mint_token
from badged.errors import BadgedError, InvalidRequestError, PolicyDeniedError
from badged.policy.model import Request
from badged.service import validate
from badged.service.auth import resolve_caller
from badged.service.deps import ServiceDeps
from badged.service.errors import ERROR_TRAILER, STATUS_FOR, Ctx
from badged.service.issuance import Authorized, Issuance, Minted
from badged_proto.spiffe import workload_pb2, workload_pb2_grpc

_logger = logging.getLogger(__name__)

SECURITY_HEADER = "workload.spiffe.io"
_NO_X509 = ("X.509-SVIDs would hand the workload a private key; badged keeps keys in hardware "
            "(use JWT-SVIDs, or `badgectl cert` after enrollment)")
BUNDLE_POLL_SECONDS = 1.0


def _require_header(context: Ctx) -> None:
    for key, value in context.invocation_metadata() or ():
        if key == SECURITY_HEADER and value == "true":
            return
    # The SPIFFE spec's wording, which clients match on.
    raise InvalidRequestError("no workload.spiffe.io header",
                              public="security header missing from request")


class SpiffeWorkloadServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, deps: ServiceDeps) -> None:
        self._d = deps
        self._issue = Issuance(deps)

    def _agent_of(self, spiffe_id: str) -> str | None:
        if not spiffe_id:
            return None
        prefix = f"spiffe://{self._d.trust_domain}/agent/"
        if not spiffe_id.startswith(prefix):
            raise PolicyDeniedError(f"JWT-SVID for foreign id {spiffe_id[:100]!r}",
                                    public="no identity issued for that SPIFFE ID")
        return validate.agent_name(spiffe_id[len(prefix):])

    async def FetchJWTSVID(self, request: workload_pb2.JWTSVIDRequest,
                           context: Ctx) -> workload_pb2.JWTSVIDResponse:
        _require_header(context)
        d = self._d
        audiences = list(dict.fromkeys(validate.audience(a) for a in request.audience))
        if not audiences:
            raise InvalidRequestError("no audience", public="audience must be specified")
        agent = self._agent_of(request.spiffe_id)
        caller = self._issue.caller(context)
        # Every audience must be allowed, for the same agent (the pipeline pins it).
        reqs = [Request(kind="token", agent=agent, audience=aud) for aud in audiences]

        def mint(auth: Authorized) -> Minted[IssuedToken]:
            key, ttl = auth.key, auth.decision.ttl
            now = d.clock()
            # JWT-SVIDs live as long as tokens (up to max_ttl), so revoking the
            # agent or its step-up grant must reach them too (badged.statuslist;
            # SPIFFE validators ignore claims they do not know).
            extra: dict[str, Any] | None = None
            idx = None
            if d.status is not None:
                idx = d.status.allocate(exp=now + ttl, agent=key.agent,
                                        grant=auth.decision.grant, delegation=None)
                extra = {"status": d.status.claim(idx)}
            claims = build_claims(issuer=d.issuer, subject=key.spiffe_id, audience=audiences,
                                  scopes=(), ttl_seconds=ttl, now=now, jti=d.new_jti(),
                                  extra=extra)
            issued = mint_token(claims=claims, key=key.handle, key_id=key.kid)
            return Minted(issued, key.spiffe_id, {
                "request": {"audiences": audiences, "ttl": ttl}, "jti": issued.jti,
                "exp": issued.expires_at,
                "credential_sha256": hashlib.sha256(issued.token.encode()).hexdigest(),
                "status_idx": idx,
            })

        auth, issued = await self._issue.issue(caller, reqs, "jwt_svid.issued",
                                               d.tokens.token_key, mint)
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id=auth.key.spiffe_id, svid=issued.token)])

    async def FetchJWTBundles(self, request: workload_pb2.JWTBundlesRequest,
                              context: Ctx) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        # Streams are outside the unary error boundary: map errors here, with
        # the same table.
        try:
            _require_header(context)
            resolve_caller(self._d, context, "workload")
        except BadgedError as exc:
            context.set_trailing_metadata(((ERROR_TRAILER, exc.code.value),))
            await context.abort(STATUS_FOR[exc.code], exc.caller_message)
        td = f"spiffe://{self._d.trust_domain}"
        last = b""
        while True:
            doc = json.dumps(self._d.tokens.jwks(), sort_keys=True).encode()
            if doc != last:  # send at once, then only on change (rotation, revocation)
                last = doc
                yield workload_pb2.JWTBundlesResponse(bundles={td: doc})
            await asyncio.sleep(BUNDLE_POLL_SECONDS)

    async def FetchX509SVID(self, request: workload_pb2.X509SVIDRequest,
                            context: Ctx) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _NO_X509)
        yield workload_pb2.X509SVIDResponse()  # pragma: no cover -- abort raises

    async def FetchX509Bundles(self, request: workload_pb2.X509BundlesRequest,
                               context: Ctx) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _NO_X509)
        yield workload_pb2.X509BundlesResponse()  # pragma: no cover -- abort raises

    async def ValidateJWTSVID(self, request: workload_pb2.ValidateJWTSVIDRequest,
                              context: Ctx) -> workload_pb2.ValidateJWTSVIDResponse:
        _require_header(context)
        audience = validate.audience(request.audience)
        if not request.svid:
            raise InvalidRequestError("no svid", public="svid must be specified")
        resolve_caller(self._d, context, "workload")
        keys = {}
        agents = {}
        for jwk in self._d.tokens.jwks()["keys"]:
            try:
                keys[jwk["kid"]] = public_key_from_jwk(jwk)
                agents[jwk["kid"]] = jwk[JWK_AGENT_MEMBER]
            except (KeyError, ValueError):
                continue
        # Only this daemon's access tokens: its issuer, an access-token typ,
        # and the key that signed must be the named agent's (an assertion
        # or a PoP by the same key is not a JWT-SVID).
        claims = verify_es256(request.svid, keys=keys, audience=audience, now=self._d.clock(),
                              typs=ACCESS_TOKEN_TYPS, issuer=self._d.issuer, key_agents=agents)
        out = struct_pb2.Struct()
        out.update(_jsonable(claims))
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(claims["sub"]), claims=out)


def _jsonable(claims: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(claims))  # type: ignore[no-any-return]
