"""Issue 18's rows: what the agent builder's kit costs the agent.

Measured in this process (the agent's side), sequentially, against a ``badged
dev`` of its own (the benchmark's SoftHSM token) and a local HTTP server in
another process:

* ``tokensource-hit``: ``TokenSource.token()`` returning the cached token
  (target: p50 under 10 µs);
* ``httpx plain`` / ``httpx + BadgeAuth bearer`` / ``httpx + BadgeAuth DPoP``:
  one GET on a keep-alive connection, a fresh single-use proof per request
  (target: DPoP adds under 1.5 ms p50) -- once with the kit's default proof
  prefetch (a run of calls to one endpoint takes proofs fetched in the
  background) and once with each proof fetched inside its request;
* ``ssh-agent sign`` against ``badgeclient`` Sign and FetchToken (grpcio),
  with the benchmark's lean HTTP/2 client beside them (the daemon's own
  time), in alternating rounds in the same run (target: badgeclient p50 at
  most 1.5x ssh-agent's). ``client CPU per call`` (this process's CPU time,
  grpcio's threads included) says where the client's time goes.

``python -m badgebench.kit`` runs it alone (provisions its own token);
``bench/run --only kit`` from the main benchmark. Numbers from a loaded
machine are not comparable with a quiet one (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from badgebench import ops, provision
from badgebench.servers import Badged, SshAgent, Unavailable

AGENT = "demo-agent"
AUDIENCE = "https://api.example.com"

POLICY = """
[bundle.kit]
audiences = ["{audience}", "{origin}"]
scopes = ["read"]
kinds = ["token", "dpop", "sign"]
max_ttl = "1h"

[[agent]]
name = "{agent}"
selectors = ["unix:uid:{uid}"]
bundles = ["kit"]
"""


def _serve_main(port_file: str) -> None:
    """A keep-alive HTTP/1.1 server answering every GET with 2 bytes (no checks: client cost only)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            # One write: headers and body in separate segments would meet the
            # client's delayed ACK (Nagle) and time 40 ms, not HTTP.
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(port_file).write_text(str(httpd.server_address[1]))
    httpd.serve_forever()


def _lat(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _row(name: str, lat_s: list[float], **extra: Any) -> dict[str, Any]:
    lat = sorted(lat_s)
    return {"name": name, "n": len(lat), "p50_us": round(statistics.median(lat) * 1e6, 2),
            "p99_us": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6, 2), **extra}


def _cpu_per_call(fn: Callable[[], object], n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def _tokensource_hit(sock: str, batches: int) -> dict[str, Any]:
    from badgeclient import TokenSource

    with TokenSource(sock) as tokens:
        tokens.token(AUDIENCE, ["read"])
        get = tokens.token
        per: list[float] = []
        for _ in range(batches):  # batches of 1,000: the timer's own cost spread thin
            t0 = time.perf_counter()
            for _ in range(1000):
                get(AUDIENCE, ["read"])
            per.append((time.perf_counter() - t0) / 1000)
        assert tokens.fetches == 1
    return _row("TokenSource cached hit", per, unit="per call, median of 1,000-call batches")


def _http(sock: str, origin: str, rounds: int, n: int) -> list[dict[str, Any]]:
    import httpx

    from badgeclient import TokenSource
    from badgeclient.httpx_auth import BadgeAuth

    url = origin + "/orders"
    lat: dict[str, list[float]] = {"plain": [], "bearer": [], "dpop": [], "dpop-each": []}
    with TokenSource(sock) as tokens:
        auths = {"plain": None,
                 "bearer": BadgeAuth(tokens, audience=AUDIENCE, scopes=["read"]),
                 "dpop": BadgeAuth(tokens, audience=AUDIENCE, scopes=["read"], dpop=True,
                                   socket_path=sock),
                 "dpop-each": BadgeAuth(tokens, audience=AUDIENCE, scopes=["read"], dpop=True,
                                        socket_path=sock, prefetch_proofs=False)}
        clients = {k: httpx.Client(auth=a) for k, a in auths.items()}
        try:
            for c in clients.values():  # connect, fetch and cache the tokens
                for _ in range(5):
                    assert c.get(url).status_code == 200
            for _ in range(rounds):  # alternate, so drift hits all three alike
                for k, c in clients.items():
                    lat[k] += _lat(lambda c=c: c.get(url), n)
        finally:
            for c in clients.values():
                c.close()
            for a in auths.values():
                if a is not None:
                    a.close()
    names = {"plain": "httpx GET, no auth", "bearer": "httpx GET + BadgeAuth (Bearer, cached)",
             "dpop": "httpx GET + BadgeAuth (DPoP, fresh proof per request)",
             "dpop-each": "httpx GET + BadgeAuth (DPoP, proof fetched in the request)"}
    base = statistics.median(lat["plain"])
    return [_row(names[k], v, added_p50_us=round((statistics.median(v) - base) * 1e6, 2))
            for k, v in lat.items()]


def _vs_ssh(sock: str, token: provision.Token, public: str, rounds: int, n: int
            ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    agent = SshAgent(token, name="ssh-agent-kit")
    closers: list[Callable[[], None]] = []
    try:
        agent.start()
        fparams = {"socket": sock, "audience": AUDIENCE, "scopes": "read", "ttl": "60"}
        specs = {
            "ssh-agent sign": ops.OpSpec("ssh-agent", {"socket": str(agent.socket), "public_der": public,
                                                       "blob": ops.ecdsa_blob(public).hex()}),
            "badgeclient Sign (grpcio)": ops.OpSpec("badgeclient-sign", {"socket": sock}),
            "badgeclient FetchToken (grpcio)": ops.OpSpec("badgeclient-fetch", fparams),
            "badged Sign (lean HTTP/2 client)": ops.OpSpec("badged-sign", {"socket": sock}),
            "badged FetchToken (lean HTTP/2 client)": ops.OpSpec("badged-fetch", fparams),
        }
        fns: dict[str, Callable[[], object]] = {}
        for name, spec in specs.items():
            op, close = ops.make(spec)
            fns[name] = op
            closers.append(close)
        lat: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            _lat(fn, 20)  # warm
        for _ in range(rounds):
            for k, fn in fns.items():
                lat[k] += _lat(fn, n)
        cpu = {k: round(_cpu_per_call(fn, n), 1) for k, fn in fns.items() if k != "ssh-agent sign"}
        ssh = statistics.median(lat["ssh-agent sign"])
        rows = [_row(k, v, vs_ssh_agent_p50=round(statistics.median(v) / ssh, 2),
                     client_cpu_us_per_call=cpu.get(k)) for k, v in lat.items()]
        return rows, cpu
    finally:
        for close in closers:
            try:
                close()
            except Exception:  # best effort at the end of a run
                pass
        agent.stop()


def run_kit(*, src: Path, token: provision.Token | None = None, public: str | None = None,
            quick: bool = False, say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Start a local HTTP server and a ``badged dev`` (this token); measure the rows."""
    base = Path(tempfile.mkdtemp(prefix="bkit", dir="/tmp"))
    os.chmod(base, 0o755)
    server: subprocess.Popen[bytes] | None = None
    daemon: Badged | None = None
    rounds, n = (2, 50) if quick else (5, 200)
    try:
        port_file = base / "port"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        server = subprocess.Popen([sys.executable, "-m", "badgebench.kit", "serve", str(port_file)],
                                  env=env)
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or server.poll() is not None:
                raise Unavailable("local HTTP server did not start")
            time.sleep(0.05)
        origin = f"http://127.0.0.1:{int(port_file.read_text())}"
        state = base / "s"
        state.mkdir()
        os.chmod(state, 0o755)
        (state / "policy.toml").write_text(POLICY.format(audience=AUDIENCE, origin=origin,
                                                         agent=AGENT, uid=os.getuid()))
        daemon = Badged(state, src)
        daemon.start()
        sock = str(daemon.socket)
        say("kit rows: TokenSource cached hit")
        rows = [_tokensource_hit(sock, 20 if quick else 100)]
        say(f"kit rows: httpx plain / Bearer / DPoP, {rounds} alternating rounds of {n}")
        rows += _http(sock, origin, rounds, n)
        if token is not None and public is not None:
            say(f"kit rows: ssh-agent vs badgeclient, {rounds} alternating rounds of {n}")
            rows += _vs_ssh(sock, token, public, rounds, n)[0]
        return {"rows": rows, "targets": _targets(rows)}
    finally:
        if daemon is not None:
            daemon.stop()
        if server is not None:
            server.terminate()
            server.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["name"]: r for r in rows}
    out = []

    def add(name: str, value: float | None, goal: str, ok: Callable[[float], bool]) -> None:
        out.append({"name": f"#18 {name}", "value": value, "goal": goal,
                    "met": None if value is None else ok(value)})

    hit = by.get("TokenSource cached hit")
    add("TokenSource cached hit p50 (µs)", hit and hit["p50_us"], "< 10", lambda v: v < 10)
    dpop = by.get("httpx GET + BadgeAuth (DPoP, fresh proof per request)")
    add("httpx + DPoP added p50 (ms)", dpop and round(dpop["added_p50_us"] / 1000, 3), "< 1.5",
        lambda v: v < 1.5)
    each = by.get("httpx GET + BadgeAuth (DPoP, proof fetched in the request)")
    add("httpx + DPoP added p50, prefetch off (ms)", each and round(each["added_p50_us"] / 1000, 3),
        "< 1.5", lambda v: v < 1.5)
    for name in ("badgeclient Sign (grpcio)", "badgeclient FetchToken (grpcio)"):
        r = by.get(name)
        add(f"{name} p50 / ssh-agent sign p50", r and r["vs_ssh_agent_p50"], "<= 1.5",
            lambda v: v <= 1.5)
    # An agent's tokens come from the kit's cache, not a FetchToken per call.
    ssh = by.get("ssh-agent sign")
    if hit and ssh:
        add("a token through the kit (TokenSource hit) p50 / ssh-agent sign p50",
            round(hit["p50_us"] / ssh["p50_us"], 4), "<= 1.5", lambda v: v <= 1.5)
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        _serve_main(argv[1])
        return 0
    module = provision.find_first(provision.MODULE_GLOBS)
    if module is None:
        print("SoftHSM2 is missing: apt-get install -y softhsm2", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parents[2]
    state = provision.make_state_dir()
    try:
        token = provision.provision_token(state, module)
        os.environ.update(token.env)
        first = Badged(state, repo)  # creates the demo agent's keys in this token
        first.start()
        first.stop()
        public = provision.key_public_der(token, f"badged/agent/{AGENT}/v1/sig", create=False)
        result = run_kit(src=repo, token=token, public=public, quick="--quick" in argv,
                         say=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        provision.cleanup(state)
    for r in result["rows"]:
        extra = {k: v for k, v in r.items() if k not in ("name", "n", "p50_us", "p99_us")}
        print(f"{r['name']:<52} p50 {r['p50_us']:>9,.1f} µs  p99 {r['p99_us']:>9,.1f} µs  {extra}")
    for t in result["targets"]:
        mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        print(f"{t['name']}: {t['value']} (goal {t['goal']}) — {mark}")
    if "--json" in argv:
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def lines(result: dict[str, Any]) -> list[str]:
    """The rows and targets as text, for the benchmark's console output and markdown."""
    if not result:
        return []
    if result.get("error"):
        return [f"\nagent kit rows (issue 18): not available ({result['error']})"]
    out = ["\nagent kit rows (issue 18), sequential, in the agent's process:"]
    for r in result.get("rows", []):
        extra = [f"+{r['added_p50_us'] / 1000:.3f} ms p50 vs plain"] if "added_p50_us" in r else []
        if r.get("vs_ssh_agent_p50") is not None:
            extra.append(f"{r['vs_ssh_agent_p50']}x ssh-agent p50")
        if r.get("client_cpu_us_per_call") is not None:
            extra.append(f"client CPU {r['client_cpu_us_per_call']} µs/call")
        out.append(f"  {r['name']}: p50 {r['p50_us']:,.1f} µs, p99 {r['p99_us']:,.1f} µs"
                   + (f" ({', '.join(extra)})" if extra else ""))
    for t in result.get("targets", []):
        mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        out.append(f"  {t['name']}: {t['value']} (goal {t['goal']}) — {mark}")
    return out
