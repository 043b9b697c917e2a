"""Prometheus metrics, off by default and off the hot path when on.

Enabled by ``[metrics] enabled = true``: ``badgectl metrics`` reads them over
the admin socket (same rule as every admin call: root, the daemon's user or
the operator group). ``[metrics] listen`` (a Unix socket path, or a loopback
``host:port``) also serves them over HTTP for a Prometheus server. What is
measured, and from where:

* credentials issued and denied, by kind, agent and reason: counted from the
  audit records (the audit mirror thread hands each durable batch over), so
  the numbers are exactly what the audit log says and no request path
  changes;
* request latency by gRPC method: one ``perf_counter`` pair per call in an
  interceptor, only when metrics are on;
* audit fsync latency (the fsync function the audit writer calls, timed),
  the audit queue depth, key-store health and connections by socket: read
  when scraped.

Label values are bounded: agent names beyond ``MAX_AGENTS`` distinct values
become ``"other"`` (a caller can ask for any agent name and be denied), and
denial reasons are classified into a fixed set, never copied.

The endpoint speaks just enough HTTP/1.1 for a scraper (``GET /metrics``):
requests are capped at 4 KiB and 5 s, and at most 8 are served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from badged.errors import ConfigError

_logger = logging.getLogger(__name__)

MAX_AGENTS = 1000
MAX_REQUEST = 4096
REQUEST_TIMEOUT_S = 5.0
MAX_CLIENTS = 8
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
SCRAPE_SERVICE = "badged.v1.MetricsService"
SCRAPE_METHOD = "Scrape"
_REASONS = (  # first match wins; anything else is "other"
    ("rate", re.compile(r"\brate\b|budget", re.I)),
    ("approval", re.compile(r"approv", re.I)),
    ("audience", re.compile(r"audience", re.I)),
    ("scope", re.compile(r"scope", re.I)),
    ("ttl", re.compile(r"\bttl\b|lifetime", re.I)),
    ("kind", re.compile(r"\bkind\b", re.I)),
    ("attestation", re.compile(r"attest|exe|process|caller", re.I)),
    ("revoked", re.compile(r"revoked", re.I)),
    ("no_binding", re.compile(r"no (policy |binding|rule)|not bound|matches no|unknown agent", re.I)),
    ("delegation", re.compile(r"delegat", re.I)),
)


def parse_listen(value: str) -> tuple[str, str | int]:
    """``/run/badged/metrics.sock`` → ("unix", path); ``127.0.0.1:9464`` → (host, port).

    Only loopback TCP: the numbers (agent names, denial rates) are for the
    operator, not the network.
    """
    if value.startswith("/"):
        if len(value.encode()) > 107:
            raise ConfigError("metrics socket path is longer than 107 bytes")
        return "unix", value
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics listen {value!r} must be an absolute socket path or "
                          "127.0.0.1:PORT")
    if host not in LOOPBACK:
        raise ConfigError(f"metrics listen {value!r}: only loopback addresses (127.0.0.1, ::1)")
    return host, int(port)


def reason_class(text: str) -> str:
    for name, rx in _REASONS:
        if rx.search(text):
            return name
    return "other"


class _Live(Collector):
    """Gauges read at scrape time from the running daemon's own state."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        conns = GaugeMetricFamily("badged_connections", "Open client connections by socket.",
                                  labels=["socket"])
        for channel, count in sorted(self._m.connections().items()):
            conns.add_metric([channel], count)
        yield conns
        yield GaugeMetricFamily("badged_audit_queue_depth",
                                "Audit records waiting to be written.",
                                value=self._m.audit_queue_depth())
        yield GaugeMetricFamily("badged_keystore_up",
                                "1 if the key store reports no problem (badged.health).",
                                value=1.0 if self._m.keystore_up() else 0.0)
        serving = GaugeMetricFamily("badged_service_serving",
                                    "1 if the gRPC health service says SERVING.",
                                    labels=["service"])
        for service, up in sorted(self._m.service_health().items()):
            serving.add_metric([service or "badged"], 1.0 if up else 0.0)
        yield serving
        yield GaugeMetricFamily("badged_start_time_seconds", "Daemon start, Unix time.",
                                value=self._m.started)


class Metrics:
    """The daemon's metrics registry and the hooks that feed it."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = time.time()
        self.credentials = Counter(
            "badged_credentials", "Credential decisions from the audit log.",
            ["kind", "agent", "decision", "reason"], registry=self.registry)
        self.audit_records = Counter("badged_audit_records", "Durable audit records.",
                                     ["event"], registry=self.registry)
        self.latency = Histogram(
            "badged_request_duration_seconds", "Time to answer a gRPC call.", ["method"],
            buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10, 60, 300),
            registry=self.registry)
        self.fsync = Histogram(
            "badged_audit_fsync_seconds", "Audit log fsync latency.",
            buckets=(.0001, .0005, .001, .002, .005, .01, .025, .05, .1, .5, 1),
            registry=self.registry)
        self._agents: set[str] = set()
        self.connections: Callable[[], Mapping[str, int]] = dict
        self.audit_queue_depth: Callable[[], int] = lambda: 0
        self.keystore_up: Callable[[], bool] = lambda: True
        self.service_health: Callable[[], Mapping[str, bool]] = dict
        self.registry.register(_Live(self))
        self._server: asyncio.AbstractServer | None = None
        self._unix_path: Path | None = None
        self._clients = asyncio.Semaphore(MAX_CLIENTS)

    # -- feeds ---------------------------------------------------------------------------

    def _agent(self, name: object) -> str:
        if not isinstance(name, str) or not name:
            return "-"
        if name in self._agents:
            return name
        if len(self._agents) >= MAX_AGENTS:
            return "other"
        self._agents.add(name)
        return name

    def observe_audit(self, batch: bytes) -> None:
        """Count one durable batch of audit records (JSON Lines), on the mirror thread."""
        for line in batch.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            event = str(rec.get("event", "?"))
            self.audit_records.labels(event=event[:64]).inc()
            decision = rec.get("decision")
            if decision not in ("allow", "deny") or not (
                    event.endswith((".issued", ".denied")) or event == "request.refused"):
                continue
            request = rec.get("request")
            kind = request.get("kind") if isinstance(request, dict) else None
            if not isinstance(kind, str):
                kind = event.split(".", 1)[0]
            reason = "" if decision == "allow" else reason_class(str(rec.get("reason", "")))
            self.credentials.labels(kind=kind[:32], agent=self._agent(rec.get("agent")),
                                    decision="issued" if decision == "allow" else "denied",
                                    reason=reason).inc()

    def timed_fsync(self, fsync: Callable[[int], None]) -> Callable[[int], None]:
        def timed(fd: int) -> None:
            start = time.perf_counter()
            try:
                fsync(fd)
            finally:
                self.fsync.observe(time.perf_counter() - start)
        return timed

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _LatencyInterceptor(self)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def add_to_server(self, server: Any, deps: Any) -> None:
        """``/badged.v1.MetricsService/Scrape`` on the admin socket, operators only.

        No protobuf message: the request is empty and the answer is the text
        exposition as bytes (identity (de)serializers), so no generated code.
        """
        from badged.service.auth import require_operator, resolve_caller

        async def scrape(request: bytes, context: Any) -> bytes:
            _peer, proc = resolve_caller(deps, context, "admin")
            require_operator(deps, proc)
            return self.exposition()

        handler = grpc.unary_unary_rpc_method_handler(
            scrape, request_deserializer=_identity, response_serializer=_identity)
        server.add_registered_method_handlers(SCRAPE_SERVICE, {SCRAPE_METHOD: handler})

    # -- endpoint ------------------------------------------------------------------------

    async def serve(self, listen: str, *, group: int | None) -> None:
        """Listen on a Unix socket (0600, or 0660 with the operator group) or loopback TCP."""
        where, arg = parse_listen(listen)
        if where == "unix":
            from badged.listener.sockets import bind_unix

            path = Path(str(arg))
            sock = bind_unix(path, mode=0o660 if group is not None else 0o600, group=group)
            self._server = await asyncio.start_unix_server(self._handle, sock=sock, limit=MAX_REQUEST)
            self._unix_path = path
        else:
            self._server = await asyncio.start_server(self._handle, host=where, port=int(arg),
                                                      limit=MAX_REQUEST)
        _logger.info("metrics listening", extra={"listen": listen})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()
            self._unix_path = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients.locked():
            writer.close()
            return
        async with self._clients:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                writer.close()
                return
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or parts[0] != b"GET":
                await self._reply(writer, 405, b"GET /metrics only\n")
                return
            if parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
                await self._reply(writer, 404, b"not found: GET /metrics\n")
                return
            await self._reply(writer, 200, self.exposition(), CONTENT_TYPE)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, body: bytes,
                     ctype: str = "text/plain; charset=utf-8") -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[code]
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        writer.close()


Handler = Any


class _LatencyInterceptor(grpc.aio.ServerInterceptor):
    """Times every unary call (outermost, so refusals are timed too)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary
        observe = self._m.latency.labels(method=handler_call_details.method).observe

        async def timed(request: Any, context: Any) -> Any:
            start = time.perf_counter()
            try:
                return await behavior(request, context)
            finally:
                observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            timed, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def attach(metrics: Metrics, *, front: Any, audit: Any, keystore: Any, monitor: Any) -> None:
    """Point the scrape-time gauges at the running daemon's parts (duck-typed)."""
    metrics.connections = lambda: connections_by_channel(front.connections)
    metrics.audit_queue_depth = lambda: len(getattr(audit, "_queue", ()))

    def keystore_up() -> bool:
        problem = getattr(keystore, "problem", None)
        return not callable(problem) or problem() is None

    metrics.keystore_up = keystore_up
    metrics.service_health = lambda: ({name: h.serving for name, h in monitor.current.items()}
                                      if monitor is not None else {})


def _identity(data: bytes) -> bytes:
    return data


def connections_by_channel(connections: Iterable[Any]) -> dict[str, int]:
    counts: dict[str, int] = {"workload": 0, "admin": 0}
    for conn in list(connections):
        channel = getattr(conn, "channel", "?")
        counts[channel] = counts.get(channel, 0) + 1
    return counts


def combine_mirrors(*mirrors: Callable[[bytes], None] | None) -> Callable[[bytes], None] | None:
    """One audit mirror that feeds several (syslog and metrics)."""
    active = [m for m in mirrors if m is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def mirror(batch: bytes) -> None:
        for m in active:
            m(batch)
    return mirror
