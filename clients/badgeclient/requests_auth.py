"""``requests`` authentication with badged credentials (``pip install badgeclient[requests]``).

::

    import requests
    from badgeclient import TokenSource
    from badgeclient.requests_auth import BadgeRequestsAuth

    tokens = TokenSource()
    auth = BadgeRequestsAuth(tokens, audience="https://api.example.com", scopes=["read"])
    requests.get("https://api.example.com/orders", auth=auth)        # Authorization: Bearer ...

    # DPoP (RFC 9449): a token bound to the agent's key, a fresh proof per request.
    auth = BadgeRequestsAuth(tokens, audience="https://api.example.com", scopes=["read"], dpop=True)
    with requests.Session() as s:
        s.auth = auth
        s.post("https://api.example.com/orders", json={"id": 1})     # Authorization: DPoP ..., DPoP: ...

The same rules as :mod:`badgeclient.httpx_auth` (one shared implementation):
a ``DPoP-Nonce`` challenge (``error="use_dpop_nonce"``) or a 401 with
``error="invalid_token"`` (the cached token is dropped) is retried once,
from a response hook, as ``requests``' own digest auth does. A request whose
body is a stream (a file, a generator) cannot be sent twice and is not
retried: the challenge response is returned as it is. Nothing here logs a
token or a proof.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import requests
from requests.auth import AuthBase
from requests.cookies import extract_cookies_to_jar

from badgeclient._authcore import AuthCore
from badgeclient.tokensource import TokenSource


class BadgeRequestsAuth(AuthBase):
    """``Authorization: Bearer`` (or ``DPoP`` + a ``DPoP`` proof header) from a :class:`TokenSource`."""

    def __init__(self, tokens: TokenSource, *, audience: str, scopes: Sequence[str] = (),
                 agent: str | None = None, dpop: bool = False,
                 socket_path: str | os.PathLike[str] | None = None, timeout: float = 10.0,
                 prefetch_proofs: bool = True) -> None:
        self._core = AuthCore(tokens, audience=audience, scopes=scopes, agent=agent, dpop=dpop,
                              socket_path=socket_path, timeout=timeout,
                              prefetch_proofs=prefetch_proofs)

    def __repr__(self) -> str:
        return f"BadgeRequestsAuth(audience={self._core.audience!r}, dpop={self._core.dpop})"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        tok = self._core.token()
        r.headers.update(self._core.headers(str(r.method), str(r.url), tok))
        r.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return r

    def _on_response(self, response: requests.Response, *, stream: bool = False,
                     timeout: float | tuple[float, float] | tuple[float, None] | None = None,
                     verify: bool | str = True,
                     cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
                     proxies: Mapping[str, str] | None = None, **_: object) -> requests.Response:
        """Retry once after a nonce challenge or a refused token (a response hook).

        The retry goes straight to the connection adapter, so this hook does
        not run on its response: at most one retry per request.
        """
        request = response.request
        url = str(request.url)
        retry = self._core.retry_reason(url, response.status_code,
                                        response.headers.get("WWW-Authenticate"),
                                        response.headers.get("DPoP-Nonce"))
        if retry is None or not isinstance(request.body, bytes | str | None):
            return response
        response.content  # noqa: B018 -- read it all, so the connection can be reused
        response.close()
        again = request.copy()
        if retry == "invalid_token":
            # The token this request carried (the source may have refreshed it since).
            stale = str(request.headers.get("Authorization", "")).partition(" ")[2]
            self._core.tokens.invalidate(stale)
        tok = self._core.token()
        again.headers.update(self._core.headers(str(again.method), url, tok))
        cookies = getattr(again, "_cookies", None)
        if cookies is not None:
            extract_cookies_to_jar(cookies, request, response.raw)  # type: ignore[no-untyped-call]
            again.prepare_cookies(cookies)
        adapter = response.connection
        retried: requests.Response = adapter.send(again, stream=stream, timeout=timeout,
                                                  verify=verify, cert=cert, proxies=proxies)
        retried.history.append(response)
        retried.request = again
        self._core.remember_nonce(url, retried.headers.get("DPoP-Nonce"))
        return retried

    def close(self) -> None:
        """Close the channel used for DPoP proofs (the token source is the caller's)."""
        self._core.close()
