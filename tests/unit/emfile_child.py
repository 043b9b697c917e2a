"""Run a front, exhaust this process's descriptors, connect clients, then free them.

Prints JSON: how many accept failures were noted, how many log lines they
produced, and whether the clients were served once descriptors were back.
Run by tests/unit/test_front_hostile.py in its own process (it eats fds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

from badged.listener.front import GrpcFront
from badged.listener.peers import PeerRegistry


async def main() -> dict[str, object]:
    lines: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.getLogger().addHandler(Count())
    logging.getLogger().setLevel(logging.INFO)
    base = Path(tempfile.mkdtemp(prefix="bem", dir="/tmp"))
    front = GrpcFront(registry=PeerRegistry(), methods={}, max_per_uid=64, max_message=1024)
    await front.serve(base / "agent.sock", channel="workload", mode=0o600)
    hog: list[int] = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for _ in range(4):
        os.close(hog.pop())
    clients = []
    for _ in range(4):  # exactly the descriptors just freed: the daemon side has none
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(base / "agent.sock"))
        except BlockingIOError:
            pass
        clients.append(s)
    await asyncio.sleep(2.5)  # asyncio retries accept every second
    failures = front.accept_failures.total
    for fd in hog[:100]:
        os.close(fd)
    del hog[:100]
    served = 0
    loop = asyncio.get_running_loop()
    for s in clients:
        try:
            head = await asyncio.wait_for(loop.sock_recv(s, 9), 5)
            served += head[3:4] == b"\x04"  # the server's SETTINGS
        except (TimeoutError, OSError):
            pass
    for fd in hog:
        os.close(fd)
    for s in clients:
        s.close()
    await front.stop_accepting()
    front.close_links()
    return {"failures": failures,
            "log_lines": sum("accept failed" in line for line in lines),
            "tracebacks": sum("out of system resource" in line for line in lines),
            "served": served}


print(json.dumps(asyncio.run(main())), flush=True)
sys.exit(0)
