"""Issue 20's rows: the credential proxy against an agent doing the same itself.

Three ways to make one authenticated GET to a real HTTPS upstream on loopback
(aiohttp, its own CA, in its own process):

* ``proxy-dpop``: through badged's proxy socket; badged checks the call,
  attaches a cached DPoP-bound token and a fresh proof, calls the upstream;
* ``direct-dpop``: the agent asks badged for a fresh proof (``DpopProof`` on
  the workload socket, token fetched once and cached) and calls the upstream
  itself -- what the proxy must at least match at 16 clients;
* ``direct-bearer``: a cached bearer token, the upstream called directly --
  the baseline for the proxy's added p50 (target: at most 1 ms).

Both DPoP sides pay one audited proof from badged per request, against the
same upstream in the same run; the proxy also writes its completion record.
Each client is its own process with keep-alive connections; every mode runs
for the same duration after a warm-up, split in rounds run in ABC CBA order
so that load from elsewhere on a shared machine falls on every mode alike.
Each row also says the CPU per call of the daemon, the upstream and the
clients (all clients together), read over the measured window only.
``python -m badgebench.proxy`` runs it alone; ``bench/run --only proxy`` too.
Numbers from a loaded machine are not comparable with a quiet one
(docs/performance.md).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from badgebench.procfs import tree_cpu_seconds
from badgebench.servers import Badged, Unavailable

AGENT = "demo-agent"
MODES = ("direct-bearer", "direct-dpop", "proxy-dpop")
PATH = "/v1/items/1"

POLICY = """
[route.bench]
upstream = "https://127.0.0.1:{port}"
credential = "dpop"
ca_file = "{ca}"

[bundle.bench]
kinds = ["token", "dpop", "proxy"]
audiences = ["https://127.0.0.1:{port}"]
max_ttl = "1h"
[[bundle.bench.proxy]]
route = "bench"
methods = ["GET"]
paths = ["/v1/**"]

[[agent]]
name = "{agent}"
selectors = ["unix:uid:{uid}"]
bundles = ["bench"]
"""


def _pki(directory: Path) -> tuple[Path, Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench CA")).issuer_name(name("bench CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - day).not_valid_after(now + day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - day).not_valid_after(now + day)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    out[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return out


# -- processes ---------------------------------------------------------------------------

def _upstream_main(cert: str, key: str, port_file: str) -> None:
    """An aiohttp HTTPS server answering every GET with a small JSON body."""
    import asyncio

    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response(text='{"ok":true}', content_type="application/json")

    async def main() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server = web.Server(handle, access_log=None)
        runner = web.ServerRunner(server)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        Path(port_file).write_text(str(port))
        await asyncio.Event().wait()

    asyncio.run(main())


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, host: str) -> None:
        super().__init__(host, timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self._path)


def _worker_main(mode: str, cfg_json: str) -> None:
    """One client: set up, say ``ready``, read the window's times from stdin, then
    call in a loop from ``start`` until ``end``; prints counts."""
    cfg = json.loads(cfg_json)
    port, ca = int(cfg["port"]), cfg["ca"]
    origin = f"https://127.0.0.1:{port}"
    request: Callable[[], int]
    if mode == "proxy-dpop":
        conn: http.client.HTTPConnection = _UnixHTTPConnection(cfg["proxy_socket"], "bench")

        def request() -> int:
            conn.request("GET", PATH, headers={"Host": "bench"})
            r = conn.getresponse()
            r.read()
            return r.status
    else:
        from badgeclient.client import WorkloadClient
        from badgeclient.credentials import CredentialClient

        ctx = ssl.create_default_context(cafile=ca)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
        dpop = mode == "direct-dpop"
        token = WorkloadClient(cfg["workload_socket"]).fetch_token(
            audience=origin, dpop_bound=dpop).token
        creds = CredentialClient(cfg["workload_socket"])

        def request() -> int:
            if dpop:
                proof = creds.dpop_proof(htm="GET", htu=origin + PATH, access_token=token).proof
                headers = {"Authorization": "DPoP " + token, "DPoP": proof}
            else:
                headers = {"Authorization": "Bearer " + token}
            conn.request("GET", PATH, headers=headers)
            r = conn.getresponse()
            r.read()
            return r.status

    # The window starts only once every client is set up: a mode whose clients
    # import more (grpc, badgeclient) must not lose part of its window on a
    # loaded machine while a lighter mode's clients are already calling.
    print("ready", flush=True)
    times = json.loads(sys.stdin.readline())
    start, warm, end = times["start"], times["start"] + times["warmup"], times["end"]
    while time.time() < start:
        time.sleep(0.001)
    lat: list[float] = []
    errors = 0
    cpu0: float | None = None
    while True:
        t0 = time.time()
        if t0 >= end:
            break
        if cpu0 is None and t0 >= warm:
            cpu0 = time.process_time()  # this client's CPU over the measured window only
        status = request()
        t1 = time.time()
        if t0 >= warm:
            if status == 200:
                lat.append(t1 - t0)
            else:
                errors += 1
    cpu = time.process_time() - cpu0 if cpu0 is not None else 0.0
    print(json.dumps({"count": len(lat), "errors": errors, "cpu_s": cpu,
                      "lat_us": [round(x * 1e6) for x in lat[:: max(1, len(lat) // 2000)]]}))


# -- the run -------------------------------------------------------------------------------

def _row(mode: str, clients: int, cfg: dict[str, Any], duration: float,
         warmup: float, pids: dict[str, int]) -> dict[str, Any]:
    """One mode for ``duration`` after ``warmup``; CPU of the daemon and the
    upstream is read at the start and the end of the measured window (the
    clients measure their own over the same window), so CPU per call is
    comparable between modes whatever else the machine runs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-m", "badgebench.proxy", "worker", mode,
                               json.dumps(cfg)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env)
             for _ in range(clients)]
    for p in procs:  # every client set up (imports, token, connection) before the window
        assert p.stdout is not None
        if p.stdout.readline().strip() != b"ready":
            raise Unavailable(f"proxy bench client for {mode} did not start")
    run_cfg = {"start": time.time() + 0.2, "warmup": warmup}
    run_cfg["end"] = run_cfg["start"] + warmup + duration
    line = (json.dumps(run_cfg) + "\n").encode()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(line)
        p.stdin.flush()
    cpu: dict[str, float] = {}
    for edge, at in (("0", run_cfg["start"] + warmup), ("1", run_cfg["end"])):
        time.sleep(max(0.0, at - time.time()))
        for name, pid in pids.items():
            cpu[name + edge] = tree_cpu_seconds(pid)
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=duration + warmup + 60)
        if p.returncode == 0 and out:
            outs.append(json.loads(out))
    count = sum(o["count"] for o in outs)
    lat = sorted(x for o in outs for x in o["lat_us"])
    row: dict[str, Any] = {
        "mode": mode, "clients": clients, "rate": round(count / duration, 1),
        "count": count, "duration_s": duration,
        "errors": sum(o["errors"] for o in outs), "failed_workers": clients - len(outs),
        "p50_us": statistics.median(lat) if lat else None,
        "p99_us": lat[int(len(lat) * 0.99)] if lat else None,
        "client_cpu_s": round(sum(o.get("cpu_s", 0.0) for o in outs), 4)}
    for name in pids:
        row[name + "_cpu_s"] = round(cpu[name + "1"] - cpu[name + "0"], 4)
    return row


def _merge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds as one row: rates and CPU from the totals, latency
    percentiles as the median of the rounds'."""
    first = rows[0]
    duration = sum(r["duration_s"] for r in rows)
    count = sum(r["count"] for r in rows)
    out: dict[str, Any] = {"mode": first["mode"], "clients": first["clients"],
                           "rate": round(count / duration, 1) if duration else 0.0,
                           "rounds": [r["rate"] for r in rows], "count": count,
                           "errors": sum(r["errors"] for r in rows),
                           "failed_workers": sum(r["failed_workers"] for r in rows)}
    for key in ("p50_us", "p99_us"):
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = statistics.median(vals) if vals else None
    for key in ("daemon", "upstream", "client"):
        total = sum(r.get(key + "_cpu_s", 0.0) for r in rows)
        out[key + "_cpu_us_per_call"] = round(total / count * 1e6) if count else None
    return out


def run_proxy(*, src: Path, duration_s: float = 5.0, warmup_s: float = 1.0,
              clients: tuple[int, ...] = (1, 16), daemon_args: tuple[str, ...] = (),
              rounds: int = 2,
              say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Start an upstream and a ``badged dev`` with a proxy route; measure the three modes."""
    base = Path(tempfile.mkdtemp(prefix="bpxb", dir="/tmp"))
    upstream: subprocess.Popen[bytes] | None = None
    daemon: Badged | None = None
    try:
        ca, cert, key = _pki(base)
        port_file = base / "port"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        upstream = subprocess.Popen([sys.executable, "-m", "badgebench.proxy", "upstream",
                                     str(cert), str(key), str(port_file)], env=env)
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or upstream.poll() is not None:
                raise Unavailable("upstream did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        state = base / "s"
        state.mkdir()
        (state / "policy.toml").write_text(POLICY.format(port=port, ca=ca, agent=AGENT,
                                                         uid=os.getuid()))
        daemon = Badged(state, src, daemon_args)
        daemon.start()
        cfg = {"port": port, "ca": str(ca), "proxy_socket": str(state / "run" / "proxy.sock"),
               "workload_socket": str(state / "run" / "agent.sock")}
        pids = {"daemon": daemon.pid or 0, "upstream": upstream.pid}
        rows = []
        for n in clients:
            # Rounds in ABC CBA order, each a share of the duration: a load
            # change on a shared machine falls on every mode alike rather
            # than on whichever row ran then.
            raw: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
            for r in range(rounds):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    say(f"proxy rows: {mode} x{n}, round {r + 1}/{rounds}, "
                        f"{duration_s / rounds:g}s")
                    raw[mode].append(_row(mode, n, cfg, duration_s / rounds, warmup_s, pids))
            for m in MODES:
                row = _merge(raw[m])
                rows.append(row)
                say(f"proxy {m} x{n}: {row['rate']:g}/s (rounds {row['rounds']}), "
                    f"p50 {row['p50_us']} us, p99 {row['p99_us']} us; CPU per call: "
                    f"daemon {row['daemon_cpu_us_per_call']} us, upstream "
                    f"{row['upstream_cpu_us_per_call']} us, clients "
                    f"{row['client_cpu_us_per_call']} us")
        return {"rows": rows, "targets": _targets(rows)}
    finally:
        if daemon is not None:
            daemon.stop()
        if upstream is not None:
            upstream.terminate()
            upstream.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def get(mode: str, n: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["mode"] == mode and r["clients"] == n), None)

    out = []
    p16, d16 = get("proxy-dpop", 16), get("direct-dpop", 16)
    if p16 and d16 and d16["rate"]:
        ratio = p16["rate"] / d16["rate"]
        out.append({"target": "proxy (DPoP per call) / agent fetching proofs itself, 16 clients",
                    "value": round(ratio, 2), "goal": ">= 1.0", "met": ratio >= 1.0})
    p1, b1 = get("proxy-dpop", 1), get("direct-bearer", 1)
    if p1 and b1 and p1["p50_us"] is not None and b1["p50_us"] is not None:
        added = (p1["p50_us"] - b1["p50_us"]) / 1000
        out.append({"target": "proxy p50 added over a direct call with a cached bearer token, "
                            "1 client (ms)", "value": round(added, 3), "goal": "<= 1 ms",
                    "met": added <= 1.0})
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] == "upstream":
        _upstream_main(*argv[1:4])
        return 0
    if argv and argv[0] == "worker":
        _worker_main(argv[1], argv[2])
        return 0
    duration = float(argv[0]) if argv else 5.0
    daemon_args = tuple(argv[1:])  # e.g. --audit-durability write
    repo = Path(__file__).resolve().parents[2]
    for sub in ("clients", "daemon"):
        sys.path.insert(0, str(repo / sub))
    result = run_proxy(src=repo, duration_s=duration, daemon_args=daemon_args,
                       say=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
