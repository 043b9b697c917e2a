"""badged's SSH agent socket against OpenSSH's ssh-agent + PKCS#11 (issue 19).

Same key, same client, same run: ``badged dev`` creates the demo agent's
``ssh`` purpose key in the benchmark's SoftHSM token; OpenSSH's ``ssh-agent``
loads that very token through its PKCS#11 provider (it lists every key in
it, this one included). One client -- :func:`sshsig_op`, a persistent agent
connection sending ``SSH_AGENTC_SIGN_REQUEST`` -- then signs with that key
through each socket in turn.

What is signed is an SSHSIG blob in namespace ``git`` (PROTOCOL.sshsig: what
``ssh-keygen -Y sign`` and ``git commit -S`` send), because badged refuses
data it cannot classify and the dev policy allows SSHSIG namespaces git and
file. ssh-agent signs it without looking. On badged's side every call is
attested, checked against the policy and audited durably before the answer,
as in production; ssh-agent does none of that.

Rows (clients 1 and 16) go into the main table; in full mode paired rounds
(ABBA, as in ``badgebench.paired``) give the two targets as medians:
throughput at 16 clients >= 2x ssh-agent's, sequential p50 <= ssh-agent's.
Both audit durability modes are measured (``bench_ssh``): a sequential
caller in the default ``fsync`` mode waits for one fsync per signature,
which ssh-agent never does.
"""

from __future__ import annotations

import hashlib
import socket
import statistics
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from badgebench.load import run_load
from badgebench.ops import Close, Op, OpSpec, ssh_identities
from badgebench.provision import Token
from badgebench.report import Row, other_cpu
from badgebench.servers import Badged, SshAgent, Unavailable

Say = Callable[[str], None]
LoadRow = Callable[..., Row]
SPIFFE = "spiffe://example.org/agent/demo-agent"  # the comment badged lists the key under
NAMESPACE = b"git"
MESSAGE = b"badgebench: a commit to sign\n"
GROUP_AGENT = "ssh-sign ssh-agent"
GROUP_BADGED = "ssh-sign badged"
LABEL_AGENT = "SSH sign: ssh-agent + PKCS#11 (SSHSIG)"
LABEL_BADGED = "SSH sign: badged SSH agent socket (SSHSIG)"


def _s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def sshsig_blob() -> bytes:
    """The bytes ``ssh-keygen -Y sign -n git`` asks the agent to sign (PROTOCOL.sshsig)."""
    return (b"SSHSIG" + _s(NAMESPACE) + _s(b"") + _s(b"sha512")
            + _s(hashlib.sha512(MESSAGE).digest()))


def _read_reply(sock: socket.socket, buf: bytearray) -> memoryview:
    view = memoryview(buf)
    got, need = 0, 4
    while got < need:
        k = sock.recv_into(view[got:], len(buf) - got)
        if k == 0:
            raise ConnectionError("the agent closed the connection")
        got += k
        if need == 4 and got >= 4:
            need = 4 + struct.unpack(">I", view[:4])[0]
            if need > len(buf):
                raise RuntimeError(f"reply of {need} bytes is larger than expected")
    return view[:need]


def sshsig_op(params: dict[str, str]) -> tuple[Op, Close]:
    """One persistent agent connection; the timed call is one SSHSIG sign request.

    Set-up checks one answer for real: SSH_AGENT_SIGN_RESPONSE with an
    ``ecdsa-sha2-nistp256`` signature that verifies with the key blob.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    blob = bytes.fromhex(params["blob"])
    data = sshsig_blob()
    body = bytes([13]) + _s(blob) + _s(data) + struct.pack(">I", 0)
    request = struct.pack(">I", len(body)) + body
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(params["socket"])
    buf = bytearray(4096)
    sock.sendall(request)
    reply = bytes(_read_reply(sock, buf))
    if reply[4] != 14:
        sock.close()
        raise RuntimeError(f"{params['socket']} refused to sign (message {reply[4]})")
    pos = 9  # length, type, signature string length
    (n,) = struct.unpack(">I", reply[pos:pos + 4])
    algo = reply[pos + 4:pos + 4 + n]
    pos += 4 + n
    (n,) = struct.unpack(">I", reply[pos:pos + 4])
    inner = reply[pos + 4:pos + 4 + n]
    if algo != b"ecdsa-sha2-nistp256":
        raise RuntimeError(f"unexpected signature algorithm {algo!r}")
    (rn,) = struct.unpack(">I", inner[:4])
    r = int.from_bytes(inner[4:4 + rn], "big")
    s = int.from_bytes(inner[8 + rn:], "big")
    # The key blob: string type, string curve, string point.
    point = blob[4 + 19 + 4 + 8 + 4:]
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    pub.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))

    sendall = sock.sendall
    recv_into = sock.recv_into
    view = memoryview(buf)
    unpack = struct.unpack
    size = len(buf)

    def op() -> object:
        sendall(request)
        got, need = 0, 4
        while got < need:  # one recv almost always returns the whole answer
            k = recv_into(view[got:], size - got)
            if k == 0:
                raise ConnectionError("the agent closed the connection")
            got += k
            if need == 4 and got >= 4:
                need = 4 + unpack(">I", view[:4])[0]
        if view[4] != 14:
            raise RuntimeError(f"the agent failed to sign (message {view[4]})")
        return got

    return op, sock.close


def _key_blob(badged_ssh_socket: Path) -> bytes:
    ids = ssh_identities(str(badged_ssh_socket))
    mine = [blob for blob, comment in ids if comment == SPIFFE]
    if len(mine) != 1:
        raise Unavailable(f"badged's SSH agent socket lists {len(ids)} key(s), "
                          f"none for {SPIFFE}")
    return mine[0]


MODES = (("fsync", ()), ("write", ("--audit-durability", "write")))


def bench_ssh(rows: list[Row], plan: Any, token: Token, state: Path, src: Path,
              load_row: LoadRow, say: Say) -> dict[str, Any]:
    """Start badged and ssh-agent on the same token key; rows, then paired rounds.

    badged runs twice on the same state dir (so the same key), in each audit
    durability mode: ``fsync`` (the default: each record synced before the
    answer) and ``write`` (written before the answer, synced within 50 ms).
    Returns the block for the report (``Report.ssh``): per mode, the paired
    rounds and their medians; or an ``error``.
    """
    agent = SshAgent(token, name="ssh-agent-ssh")
    out: dict[str, Any] = {}
    try:
        for mode, args in MODES:
            daemon = Badged(state, src, args)
            try:
                ready = daemon.start()
                say(f"ssh: badged ({mode} audit) ready in {ready:.2f}s")
                bsock = state / "run" / "ssh-agent.sock"
                blob = _key_blob(bsock)
                if agent.proc is None:  # after badged made the key: ssh-agent loads it
                    agent.start()
                    if not any(b == blob for b, _ in ssh_identities(str(agent.socket))):
                        raise Unavailable("ssh-agent does not list badged's SSH key")
                theirs = OpSpec("ssh-sshsig", {"socket": str(agent.socket), "blob": blob.hex()})
                ours = OpSpec("ssh-sshsig", {"socket": str(bsock), "blob": blob.hex()})
                for n in (1, 16):
                    if mode == "fsync":
                        load_row(rows, GROUP_AGENT, LABEL_AGENT, n, [theirs], plan,
                                 server_pid=agent.pid,
                                 note="same token key as badged's rows; no policy, no audit")
                    load_row(rows, f"{GROUP_BADGED} {mode}", f"{LABEL_BADGED}, {mode} audit", n,
                             [ours], plan, server_pid=daemon.pid,
                             note="attestation, policy (kind ssh, namespace git), audit "
                                  + ("fsync'd" if mode == "fsync" else "written") +
                                  " before the answer")
                rounds = min(plan.pair_rounds, 3)
                if rounds:
                    say(f"ssh paired rounds ({mode} audit): ssh-agent and badged alternating, "
                        f"{rounds} rounds of {plan.pair_duration_s:g}s")
                    out[mode] = _paired(rounds, plan, theirs, agent.pid, ours, daemon.pid, say)
            finally:
                daemon.stop()
        return out
    except (Unavailable, OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        say(f"ssh: not available ({exc})")
        rows.append(Row(group=GROUP_BADGED, label=LABEL_BADGED, clients=0, error=str(exc)))
        return {**out, "error": str(exc)[:500]}
    finally:
        agent.stop()


def _paired(rounds: int, plan: Any, theirs: OpSpec, their_pid: int | None, ours: OpSpec,
            our_pid: int | None, say: Say) -> dict[str, Any]:
    seq = [("ssh-agent@1", theirs, their_pid, 1), ("badged@1", ours, our_pid, 1),
           ("ssh-agent@16", theirs, their_pid, 16), ("badged@16", ours, our_pid, 16)]
    per_round: list[dict[str, Any]] = []
    for r in range(rounds):
        runs: dict[str, dict[str, float | None]] = {}
        for name, spec, pid, n in (seq if r % 2 == 0 else seq[::-1]):
            res = run_load([spec], n, duration_s=plan.pair_duration_s, slice_s=plan.slice_s,
                           warmup_s=plan.warmup_s, server_pid=pid)
            if res.error:
                raise RuntimeError(f"{name}: {res.error}")
            runs[name] = {"ops_per_s": round(res.median_slice_ops_per_s, 1),
                          "p50_us": round(res.p50_us, 1), "p99_us": round(res.p99_us, 1),
                          "server_cpu_us_per_op": _r(res.server_cpu_us_per_op),
                          "other_cpu": _r(other_cpu(res))}
        ratios = {"ssh16_vs_agent16": _div(runs["badged@16"]["ops_per_s"],
                                           runs["ssh-agent@16"]["ops_per_s"]),
                  "ssh1_p50_vs_agent1_p50": _div(runs["badged@1"]["p50_us"],
                                                 runs["ssh-agent@1"]["p50_us"])}
        say(f"ssh paired round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in ratios.items() if v is not None))
        per_round.append({"runs": runs, "ratios": ratios})
    median = {k: _median([p["ratios"][k] for p in per_round]) for k in per_round[0]["ratios"]}
    runs_median = {name: {m: _median([p["runs"][name][m] for p in per_round])
                          for m in ("ops_per_s", "p50_us", "p99_us")}
                   for name in per_round[0]["runs"]}
    return {"rounds": per_round, "median": median, "median_runs": runs_median,
            "duration_s": plan.pair_duration_s}


def _table_ratios(rows: list[Row], mode: str) -> dict[str, float | None]:
    def row(group: str, n: int) -> Row | None:
        return next((r for r in rows if r.group == group and r.clients == n and r.rate), None)

    a1, a16 = row(GROUP_AGENT, 1), row(GROUP_AGENT, 16)
    b1, b16 = row(f"{GROUP_BADGED} {mode}", 1), row(f"{GROUP_BADGED} {mode}", 16)
    return {"ssh16_vs_agent16": _div(b16.rate, a16.rate) if a16 and b16 else None,
            "ssh1_p50_vs_agent1_p50": _div(b1.result.p50_us, a1.result.p50_us)
            if a1 and b1 and a1.result and b1.result else None}


def targets(rows: list[Row], block: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 19's two targets per audit mode: paired medians if run, else the table rows."""
    out = []
    for mode, _ in MODES:
        med = block.get(mode, {}).get("median")
        src = f"paired, median of {len(block[mode]['rounds'])}" if med else "table rows"
        vals = med or _table_ratios(rows, mode)
        for key, name, goal, ok in (
                ("ssh16_vs_agent16", "SSH sign@16 badged / ssh-agent throughput", ">= 2.0",
                 lambda v: v >= 2.0),
                ("ssh1_p50_vs_agent1_p50", "SSH sign sequential p50 badged / ssh-agent",
                 "<= 1.0", lambda v: v <= 1.0)):
            v = vals.get(key)
            out.append({"target": f"#19 {name}, {mode} audit [{src}]",
                        "value": None if v is None else round(v, 2), "goal": goal,
                        "met": None if v is None else ok(v)})
    return out


def lines(block: dict[str, Any]) -> list[str]:
    """The paired blocks as text (stdout and the Markdown file)."""
    out: list[str] = []
    if block.get("error"):
        out += ["", f"SSH agent rounds: not available ({str(block['error'])[:160]})"]
    for mode, _ in MODES:
        b = block.get(mode)
        if not b or not b.get("rounds"):
            continue
        mr = b["median_runs"]
        out += ["", f"SSH agent sign, SSHSIG on the same token key, badged with {mode} audit "
                    f"(ABBA, median of {len(b['rounds'])} rounds, {b['duration_s']:g}s per run):"]
        for name in ("ssh-agent@1", "badged@1", "ssh-agent@16", "badged@16"):
            v = mr[name]
            out.append(f"  {name:13} {v['ops_per_s'] or 0:8,.0f} signs/s  "
                       f"p50 {v['p50_us'] or 0:7,.0f} µs  p99 {v['p99_us'] or 0:7,.0f} µs")
    return out


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
