"""A real daemon with its proxy socket, a real HTTPS upstream on loopback with its
own CA that records every request it receives, and agent processes."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from badgeclient import WorkloadClient
from tests.client.oauth_as import AuthServer, token_endpoint
from tests.conftest import short_tmpdir
from tests.e2e.conftest import RunningDaemon, _pythonpath, softhsm_available, start_daemon

__all__ = ["softhsm_available"]

NOBODY = 65534
HERE = Path(__file__).parent


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1: (ca, cert, key) PEMs."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("proxy test CA"))
          .issuer_name(_name("proxy test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class Upstream:
    """A recording HTTPS server: every request's method, raw path, headers and body."""

    port: int
    server: ThreadingHTTPServer
    received: list[dict[str, Any]] = field(default_factory=list)
    redirect_to: str = ""

    def clear(self) -> None:
        self.received.clear()


def start_upstream(cert: Path, key: Path) -> Upstream:
    box: dict[str, Upstream] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            up = box["up"]
            up.received.append({"method": self.command, "path": self.path,
                                "headers": list(self.headers.items()), "body": body})
            if self.path.endswith("/redirect") and up.redirect_to:
                self.send_response(302)
                self.send_header("Location", up.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = json.dumps({"ok": True, "n": len(up.received)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = _any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    up = Upstream(server.server_address[1], server)
    box["up"] = up
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return up


class HttpsAuthServer(AuthServer):
    """tests/client/oauth_as.py's authlib AS, served over HTTPS with the test CA."""

    @property
    def origin(self) -> str:
        assert self.httpd is not None
        return f"https://127.0.0.1:{self.httpd.server_address[1]}"


def start_auth_server(cert: Path, key: Path, clients: set[str]) -> HttpsAuthServer:
    state = HttpsAuthServer(jwks={"keys": []}, clients=clients)
    token_response = token_endpoint(state)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(min(int(self.headers.get("content-length", "0")), 65536))
            form = dict(parse_qsl(body.decode()))
            state.token_requests.append(form)
            with lock:
                status, payload = token_response(form)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    state.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    state.httpd.socket = ctx.wrap_socket(state.httpd.socket, server_side=True)
    threading.Thread(target=state.httpd.serve_forever, daemon=True).start()
    return state


POLICY = """
[route.echo]
upstream = "https://127.0.0.1:{port}/api"
credential = "dpop"
ca_file = "{ca}"
max_request_bytes = 1024

[route.plain]
upstream = "https://127.0.0.1:{port}/api"
credential = "bearer"
ca_file = "{ca}"
scopes = ["read"]

[route.limited]
upstream = "https://127.0.0.1:{port}/api"
credential = "bearer"
ca_file = "{ca}"
rate = "2/1h"

[route.untrusted]
upstream = "https://127.0.0.1:{port}/api"
credential = "bearer"

[route.keyed]
upstream = "https://127.0.0.1:{port}/api"
credential = "secret"
secret = "upstream-key"
header = "X-Api-Key"
ca_file = "{ca}"

[route.oauthed]
upstream = "https://127.0.0.1:{port}/api"
credential = "oauth"
token_endpoint = "https://127.0.0.1:{as_port}/token"
ca_file = "{ca}"
scopes = ["read"]

[route.oauth-unregistered]
upstream = "https://127.0.0.1:{port}/api"
credential = "oauth"
token_endpoint = "https://127.0.0.1:{as_port}/token"
client_id = "unregistered-client"
ca_file = "{ca}"

[route.oauth-foreign]
upstream = "https://127.0.0.1:{port}/api"
credential = "oauth"
token_endpoint = "https://127.0.0.1:{as_port}/token"
client_id = "another-agents-client"
ca_file = "{ca}"

[bundle.calls]
kinds = ["proxy"]
[[bundle.calls.proxy]]
route = "oauthed"
methods = ["GET"]
paths = ["/**"]
[[bundle.calls.proxy]]
route = "oauth-unregistered"
methods = ["GET"]
paths = ["/**"]
[[bundle.calls.proxy]]
route = "oauth-foreign"
methods = ["GET"]
paths = ["/**"]
[[bundle.calls.proxy]]
route = "echo"
methods = ["GET", "POST"]
paths = ["/items", "/items/*", "/redirect", "/public/**"]
[[bundle.calls.proxy]]
route = "plain"
methods = ["GET"]
paths = ["/**"]
[[bundle.calls.proxy]]
route = "limited"
methods = ["GET"]
paths = ["/**"]
[[bundle.calls.proxy]]
route = "untrusted"
methods = ["GET"]
paths = ["/**"]
[[bundle.calls.proxy]]
route = "keyed"
methods = ["GET", "POST"]
paths = ["/**"]

[bundle.gated]
kinds = ["proxy"]
approval = true
[[bundle.gated.proxy]]
route = "echo"
methods = ["DELETE"]
paths = ["/items/*"]

[[agent]]
name = "demo-agent"
selectors = ["unix:uid:{uid}"]
bundles = ["calls", "gated"]
client_ids = ["unregistered-client"]

[approval]
requester_may_approve = true
"""


@dataclass
class ProxyEnv:
    daemon: RunningDaemon
    upstream: Upstream
    other: Upstream  # another host: a redirect target that must see no credential
    ca: Path
    auth: HttpsAuthServer

    @property
    def socket(self) -> Path:
        return self.daemon.state / "run" / "proxy.sock"

    def audit(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for f in sorted((self.daemon.state / "audit").glob("audit-*.jsonl")):
            out += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.audit() if r.get("event") == name]


@pytest.fixture(scope="module")
def proxy_env(softhsm_available: None) -> Iterator[ProxyEnv]:
    base = short_tmpdir("bpx")
    os.chmod(base, 0o755)  # other users must reach run/proxy.sock
    ca, cert, key = make_pki(base)
    os.chmod(ca, 0o644)
    up = start_upstream(cert, key)
    other = start_upstream(cert, key)
    up.redirect_to = f"https://127.0.0.1:{other.port}/landing"
    auth = start_auth_server(cert, key, {"spiffe://example.org/agent/demo-agent"})
    assert auth.httpd is not None
    state = base / "s"
    state.mkdir()
    (state / "policy.toml").write_text(POLICY.format(
        port=up.port, ca=ca, uid=os.getuid(), as_port=auth.httpd.server_address[1]))
    d = start_daemon(state)
    auth.jwks = WorkloadClient(str(d.workload)).jwks()  # the AS trusts the agents' keys
    yield ProxyEnv(d, up, other, ca, auth)
    auth.httpd.shutdown()
    d.stop()
    if os.environ.get("PROXY_TEST_LOG"):
        print(d.log_text())
    up.server.shutdown()
    other.server.shutdown()
    shutil.rmtree(base, ignore_errors=True)


class Agent:
    """A running agent_client.py: call() sends one request through the proxy."""

    def __init__(self, env: ProxyEnv, uid: int | None = None) -> None:
        args = [sys.executable, str(HERE / "agent_client.py"), str(env.socket)]
        if uid is not None:
            args.append(str(uid))
        # The agent's whole environment: nothing of any credential in it.
        agent_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                     "PYTHONPATH": _pythonpath() + os.pathsep + str(HERE.parent.parent)}
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=agent_env, text=True)
        assert self.proc.stdout is not None
        ready = json.loads(self.proc.stdout.readline())
        self.pid = int(ready["ready"])

    def call(self, host: str, path: str, method: str = "GET",
             headers: dict[str, str] | None = None, body: str = "") -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"host": host, "path": path, "method": method,
                                          "headers": headers or {}, "body": body}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "agent process died"
        out: dict[str, Any] = json.loads(line)
        return out

    def memory_contains(self, needle: bytes) -> bool:
        """Search every readable mapping of the live agent process for ``needle``."""
        found = False
        with open(f"/proc/{self.pid}/maps") as maps, \
                open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:
            for line in maps:
                addr, perms = line.split()[:2]
                if not perms.startswith("r"):
                    continue
                start, end = (int(x, 16) for x in addr.split("-"))
                try:
                    mem.seek(start)
                    chunk = mem.read(end - start)
                except (OSError, ValueError, OverflowError):
                    continue
                if needle in chunk:
                    found = True
        return found

    def environ(self) -> bytes:
        return Path(f"/proc/{self.pid}/environ").read_bytes()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=20)


@pytest.fixture
def agent(proxy_env: ProxyEnv) -> Iterator[Agent]:
    a = Agent(proxy_env)
    yield a
    a.close()
