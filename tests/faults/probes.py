"""Probes shared by the fault tests: health with reasons, timed calls, load."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

WORKLOAD = "badged.v1.WorkloadService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """gRPC health over one socket; ``detail()`` needs the admin socket."""

    def __init__(self, sock: Path) -> None:
        self._ch = grpc.insecure_channel(f"unix:{sock}")
        self._stub = health_pb2_grpc.HealthStub(self._ch)

    def status(self, service: str = WORKLOAD, timeout: float = 5) -> int:
        resp = self._stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return int(resp.status)

    def detail(self, timeout: float = 5) -> dict[str, Any]:
        _, call = self._stub.Check.with_call(health_pb2.HealthCheckRequest(), timeout=timeout)
        for key, value in call.trailing_metadata() or ():
            if key == "badged-health":
                doc: dict[str, Any] = json.loads(value)
                return doc
        return {}

    def wait_for(self, want: int, service: str = WORKLOAD, within: float = 10) -> float:
        """Seconds until ``service`` reports ``want``; fails after ``within``."""
        start = time.monotonic()
        while True:
            if self.status(service) == want:
                return time.monotonic() - start
            if time.monotonic() - start > within:
                raise AssertionError(f"{service} not {want} within {within} s")
            time.sleep(0.05)

    def close(self) -> None:
        self._ch.close()


@dataclass
class Outcome:
    ok: int = 0
    unavailable: int = 0
    other: list[str] = field(default_factory=list)
    slowest: float = 0.0


class Loader(threading.Thread):
    """Calls ``fn`` in a loop; records outcomes and the slowest call."""

    def __init__(self, fn: Callable[[], object], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self._halt = stop
        self.outcome = Outcome()

    def run(self) -> None:
        from badgeclient import UnavailableError

        while not self._halt.is_set():
            t0 = time.monotonic()
            try:
                self._fn()
                self.outcome.ok += 1
            except UnavailableError:
                self.outcome.unavailable += 1
                time.sleep(0.02)
            except Exception as exc:  # anything else is a finding
                self.outcome.other.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)
            self.outcome.slowest = max(self.outcome.slowest, time.monotonic() - t0)
