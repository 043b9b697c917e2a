"""A real OAuth authorization server on loopback, built on authlib, and an API it protects.

``POST /token``: client credentials and RFC 8693 token exchange, both with
RFC 7523 ``private_key_jwt`` client authentication checked by authlib against
the daemon's JWKS (replayed assertions refused). The exchange's subject
token -- a badged token carrying a delegation -- is checked with
``badgeclient.verify`` and must name the authenticated client as its actor.
``GET /api/whoami``: the API; accepts only tokens this AS issued and not
revoked, and answers with what the AS recorded for them (sub, act, scope).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

from authlib.oauth2 import rfc6749
from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError
from authlib.oauth2.rfc6749.grants import BaseGrant, ClientCredentialsGrant, TokenEndpointMixin
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc.jwk import KeySet

from badgeclient.oauth import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, TOKEN_EXCHANGE
from badgeclient.verify import VerificationError, Verifier

METHOD = JWTBearerClientAssertion.CLIENT_AUTH_METHOD


@dataclass
class AuthServer:
    """The AS's state, visible to the test."""

    jwks: dict[str, Any]
    clients: set[str]
    expires_in: int = 120
    down: bool = False
    issued: dict[str, dict[str, Any]] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    httpd: ThreadingHTTPServer | None = None

    @property
    def origin(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def token_url(self) -> str:
        return self.origin + "/token"


def token_endpoint(state: AuthServer) -> Any:
    """The AS's token endpoint as a function of the POSTed form: (status, JSON body).

    Served over HTTP by :func:`serve` (and over HTTPS by tests/proxy), or called
    in-process where no HTTP is under test (tests/credentials/test_e2e.py).
    """
    class Client(rfc6749.ClientMixin):  # type: ignore[misc]
        def __init__(self, client_id: str) -> None:
            self.client_id = client_id

        def get_client_id(self) -> str:
            return self.client_id

        def get_allowed_scope(self, scope: str) -> str:
            return scope

        def check_endpoint_auth_method(self, m: str, endpoint: str) -> bool:
            return bool(m == METHOD)

        def check_grant_type(self, grant_type: str) -> bool:
            return grant_type in ("client_credentials", TOKEN_EXCHANGE)

    class Assertion(JWTBearerClientAssertion):  # type: ignore[misc]
        seen: set[str] = set()

        def get_audiences(self) -> list[str]:
            return [state.token_url]

        def validate_jti(self, claims: Any, jti: str) -> bool:
            if jti in self.seen:
                return False
            self.seen.add(jti)
            return True

        def resolve_client_public_key(self, client: Any) -> Any:
            return KeySet.import_key_set(state.jwks)  # type: ignore[arg-type]

    class Credentials(ClientCredentialsGrant):  # type: ignore[misc]
        TOKEN_ENDPOINT_AUTH_METHODS = [METHOD]

    class Exchange(BaseGrant, TokenEndpointMixin):  # type: ignore[misc]
        """RFC 8693, delegation semantics: the subject is the user, the actor the client."""

        GRANT_TYPE = TOKEN_EXCHANGE
        TOKEN_ENDPOINT_AUTH_METHODS = [METHOD]

        def validate_token_request(self) -> None:
            client = self.authenticate_token_endpoint_client()
            form = self.request.form
            if form.get("subject_token_type") != JWT_TOKEN_TYPE:
                raise InvalidRequestError("subject_token_type must be a JWT")
            try:
                v = Verifier(jwks=state.jwks).verify_token(form.get("subject_token", ""),
                                                           audience=state.token_url)
            except VerificationError as exc:
                raise InvalidGrantError(f"subject token: {exc.reason}") from None
            if v.user is None:
                raise InvalidGrantError("the subject token carries no delegation")
            if v.agent != client.client_id:
                raise InvalidGrantError("the actor is not the authenticated client")
            asked = set(str(form.get("scope", "")).split())
            if not asked <= set(v.scopes):
                raise InvalidGrantError("scope beyond the delegation")
            self.request.client = client
            self.request.user = {"sub": v.user, "act": {"sub": v.agent}}

        def create_token_response(self) -> tuple[int, Any, Any]:
            token = self.generate_token(user=self.request.user, scope=self.request.payload.scope,
                                        include_refresh_token=False)
            token["issued_token_type"] = ACCESS_TOKEN_TYPE
            return 200, token, self.TOKEN_RESPONSE_HEADER

    class Request(rfc6749.OAuth2Request):  # type: ignore[misc]
        def __init__(self, url: str, form: dict[str, str]) -> None:
            super().__init__("POST", url, headers={})
            self._form = form
            self.payload = BasicOAuth2Payload(form)

        @property
        def form(self) -> dict[str, str]:
            return self._form

        @property
        def args(self) -> dict[str, str]:
            return {}

    counter = iter(range(1, 1 << 30))

    def generate(**kw: Any) -> dict[str, Any]:
        token = f"as-{next(counter)}"
        user = kw.get("user")
        state.issued[token] = {
            "client": kw["client"].client_id, "scope": kw.get("scope") or "",
            **(user if isinstance(user, dict) else {"sub": kw["client"].client_id})}
        return {"access_token": token, "token_type": "Bearer", "expires_in": state.expires_in,
                **({"scope": kw["scope"]} if kw.get("scope") else {})}

    class Server(rfc6749.AuthorizationServer):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.register_token_generator("default", generate)
            self.register_grant(Credentials)
            self.register_grant(Exchange)
            self.register_client_auth_method(METHOD, Assertion())

        def query_client(self, client_id: str) -> Any:
            return Client(client_id) if client_id in state.clients else None

        def save_token(self, token: Any, request: Any) -> None:
            pass

        def send_signal(self, *args: Any, **kwargs: Any) -> None:
            pass

        def create_oauth2_request(self, request: Any) -> Any:
            return request

        def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any]:
            return status, body

    server = Server()
    return lambda form: server.create_token_response(Request(state.token_url, form))


def serve(jwks: dict[str, Any], clients: set[str]) -> AuthServer:
    state = AuthServer(jwks=jwks, clients=clients)
    token_response = token_endpoint(state)
    lock = threading.Lock()  # authlib's server object is not documented as thread-safe

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(min(int(self.headers.get("content-length", "0")), 65536))
            if self.path != "/token":
                return self._send(404, {"error": "not_found"})
            if state.down:
                return self._send(503, {"error": "temporarily_unavailable"})
            form = dict(parse_qsl(body.decode()))
            state.token_requests.append(form)
            with lock:
                status, payload = token_response(form)
            self._send(status, payload)

        def do_GET(self) -> None:
            scheme, _, token = self.headers.get("authorization", "").partition(" ")
            record = state.issued.get(token)
            if self.path != "/api/whoami" or scheme != "Bearer" or record is None \
                    or token in state.revoked:
                return self._send(401, {"error": "invalid_token"},
                                  {"WWW-Authenticate": 'Bearer error="invalid_token"'})
            self._send(200, record)

        def _send(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    state.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=state.httpd.serve_forever, daemon=True).start()
    return state
