"""SSH agent requests count as calls in flight, like the gRPC front's (issue 19).

The audit log fsyncs a lone call's record inline on the loop thread and
shares one fsync between records only when it sees calls in flight; SSH
requests that did not count made every record its own inline fsync under
load (~270 signs/s at 16 clients instead of ~1,900). Here a real socket and
a real connection; the counter records what the server told it.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
from typing import cast

from badged.service.deps import ServiceDeps
from badged.sshagent import wire
from badged.sshagent.server import SshAgentServer
from tests.conftest import short_tmpdir


class Counter:
    def __init__(self) -> None:
        self.started = 0
        self.done = 0
        self.peak = 0

    def call_started(self) -> None:
        self.started += 1
        self.peak = max(self.peak, self.started - self.done)

    def call_done(self, _task: object) -> None:
        self.done += 1


def _ask(path: str, msgs: list[bytes]) -> list[int]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"".join(msgs))  # pipelined: answered one at a time, in order
        out = []
        for _ in msgs:
            head = s.recv(4, socket.MSG_WAITALL)
            (n,) = struct.unpack(">I", head)
            out.append(s.recv(n, socket.MSG_WAITALL)[0])
        return out


def test_each_request_counts_as_a_call_in_flight() -> None:
    base = short_tmpdir("bsc")
    counter = Counter()

    async def main() -> list[int]:
        # An unknown extension is answered without touching the deps.
        server = SshAgentServer(cast(ServiceDeps, object()), base / "a.sock", max_per_uid=4,
                                idle_timeout=30, calls=counter)
        await server.start()
        try:
            msg = wire.frame(wire.SSH_AGENTC_EXTENSION, wire.string(b"nope@example.org"))
            return await asyncio.to_thread(_ask, str(base / "a.sock"), [msg] * 3)
        finally:
            await server.close()

    try:
        answers = asyncio.run(main())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert answers == [wire.SSH_AGENT_FAILURE] * 3
    assert (counter.started, counter.done) == (3, 3)
    assert counter.peak == 1  # one request per connection at a time
