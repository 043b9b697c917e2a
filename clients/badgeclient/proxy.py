"""HTTP clients that reach APIs through badged's credential proxy (docs/proxy.md).

The agent holds no credential: it sends ``http://ROUTE/path`` over the proxy's
Unix socket and badged attaches the route's credential and makes the HTTPS
call. These helpers only build clients bound to that socket::

    from badgeclient.proxy import httpx_client, requests_session

    gh = httpx_client("github")                     # base_url http://github
    gh.get("/repos/acme/widgets/issues").json()

    s = requests_session()
    s.get("http://github/repos/acme/widgets/issues").json()

The socket is ``BADGED_PROXY_SOCKET``, else ``proxy.sock`` beside
``BADGED_SOCKET``, else ``/run/badged/proxy.sock``; the agent name (for a
caller that may act as several) is ``BADGED_AGENT``, sent as ``Badged-Agent``.
``httpx`` and ``requests`` are imported only by the function that needs them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx
    import requests

AGENT_HEADER = "Badged-Agent"
DEFAULT_PROXY_SOCKET = "/run/badged/proxy.sock"


def proxy_socket() -> str:
    """BADGED_PROXY_SOCKET, else ``proxy.sock`` beside BADGED_SOCKET, else the default."""
    env = os.environ.get("BADGED_PROXY_SOCKET")
    if env:
        return env
    workload = os.environ.get("BADGED_SOCKET")
    return str(Path(workload).with_name("proxy.sock")) if workload else DEFAULT_PROXY_SOCKET


def _headers(agent: str | None) -> dict[str, str]:
    name = agent if agent is not None else os.environ.get("BADGED_AGENT", "")
    return {AGENT_HEADER: name} if name else {}


def httpx_client(route: str, *, agent: str | None = None, socket_path: str | None = None,
                 **kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` whose base URL is the route, over the proxy socket.

    Redirects are not followed (the proxy returns them as they are; a
    redirect to another host is not a route). ``kwargs`` go to the client.
    """
    import httpx

    transport = httpx.HTTPTransport(uds=socket_path or proxy_socket())
    headers = {**_headers(agent), **dict(kwargs.pop("headers", {}) or {})}
    return httpx.Client(transport=transport, base_url=f"http://{route}", headers=headers,
                        follow_redirects=False, **kwargs)


def async_httpx_client(route: str, *, agent: str | None = None,
                       socket_path: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
    """:func:`httpx_client` for asyncio."""
    import httpx

    transport = httpx.AsyncHTTPTransport(uds=socket_path or proxy_socket())
    headers = {**_headers(agent), **dict(kwargs.pop("headers", {}) or {})}
    return httpx.AsyncClient(transport=transport, base_url=f"http://{route}", headers=headers,
                             follow_redirects=False, **kwargs)


def requests_session(*, agent: str | None = None,
                     socket_path: str | None = None) -> requests.Session:
    """A ``requests.Session`` whose ``http://`` URLs go over the proxy socket.

    requests has no Unix-socket transport; this mounts a small adapter whose
    connections connect to the socket (``http://ROUTE/path``). ``https://``
    URLs are left alone: they would bypass the proxy (and have no credential).
    """
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection
    from urllib3.connectionpool import HTTPConnectionPool

    path = socket_path or proxy_socket()

    class _Connection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            timeout = self.timeout
            sock.settimeout(timeout if isinstance(timeout, (int, float)) else None)
            sock.connect(path)
            return sock

    class _Pool(HTTPConnectionPool):
        ConnectionCls = _Connection

    class _Adapter(HTTPAdapter):
        def get_connection_with_tls_context(self, request: Any, verify: Any,
                                            proxies: Any = None,
                                            cert: Any = None) -> HTTPConnectionPool:
            host = urlsplit(request.url).hostname or "localhost"
            pool = self._pools.get(host)
            if pool is None:
                pool = self._pools[host] = _Pool(host)
            return pool

        def close(self) -> None:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()
            super().close()

        def __init__(self) -> None:
            super().__init__()
            self._pools: dict[str, HTTPConnectionPool] = {}

    session = requests.Session()
    session.trust_env = False  # no HTTP(S)_PROXY detour, no .netrc credentials
    session.mount("http://", _Adapter())
    session.headers.update(_headers(agent))
    return session


__all__ = ["AGENT_HEADER", "async_httpx_client", "httpx_client", "proxy_socket",
           "requests_session"]
