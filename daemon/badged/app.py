"""Composition root: the one place that builds adapters and wires them.

Start order follows the request path backwards (key store, identities,
policy, audit, the servicers, then the public sockets' front),
so the daemon never accepts a connection it cannot serve. Stop order is the
reverse: stop accepting, let in-flight calls finish, then close the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2_grpc

from badged.attest.process import ProcessAttestor
from badged.audit.log import AuditConfig, AuditLog
from badged.audit.reader import find_marked
from badged.config import DaemonConfig
from badged.core.clock import Clock, StepDetector, system_clock
from badged.core.ids import new_jti
from badged.core.session_keys import Schedule
from badged.errors import BadgedError, KeyNotFoundError
from badged.fsutil import atomic_write, check_dir_safe, ensure_private_dir, lock_state_dir
from badged.health import HealthMonitor
from badged.identity.registry import AgentRegistry
from badged.identity.session import SessionKeyManager
from badged.identity.store import AgentStore
from badged.keystore import open_keystore
from badged.keystore.port import DEVICE_KEY, KeyHandle, KeyStore
from badged.listener.budget import Classifier
from badged.listener.front import GrpcFront, MethodTable
from badged.listener.peers import PeerRegistry
from badged.policy.grants import GrantStore
from badged.policy.loader import load_policy
from badged.policy.model import Policy
from badged.policy.ratelimit import RateLimiter
from badged.preflight import checked_policy
from badged.service.admin import AdminServicer
from badged.service.approvals import ApprovalBoard
from badged.service.denials import DenialCounter, install_refusal_log_limits
from badged.service.deps import PolicyHolder, ServiceDeps, SigningRunner
from badged.service.errors import ErrorBoundary
from badged.service.health import HealthServicer
from badged.service.spiffe import SpiffeWorkloadServicer
from badged.service.workload import WorkloadServicer
from badged.sshagent.ca import SshCa, load_ca_key
from badged.sshagent.server import SshAgentServer
from badged.statuslist import StatusList, issued_from_audit

if TYPE_CHECKING:
    from badged.metrics import Metrics
    from badged.proxy.secretstore import SecretStore
    from badged.proxy.server import ProxyServer
from badged_proto.spiffe import workload_pb2_grpc as spiffe_pb2_grpc
from badged_proto.v1 import admin_pb2_grpc, workload_pb2_grpc

_logger = logging.getLogger(__name__)

MAX_MESSAGE = 128 * 1024


def _new_jti() -> str:
    return new_jti()  # token_urlsafe(18) from a pooled CSPRNG read (badged.core.ids)


def _prepare_socket_dir(path: Path) -> None:
    """The socket directory is 0755 and owned by us; created if missing."""
    if not path.exists():
        path.mkdir(mode=0o755, parents=True)
        os.chmod(path, 0o755)  # noqa: S103 -- socket dir must be traversable by agents
    check_dir_safe(path, private=False)


class Daemon:
    """A running badged. ``start()`` then ``wait()``; ``stop()`` from a signal."""

    def __init__(self, config: DaemonConfig, *, clock: Clock = system_clock,
                 keystore: KeyStore | None = None, ensure_agents: tuple[str, ...] = (),
                 state_lock_fd: int = -1) -> None:
        self.config = config
        self._ensure_agents = ensure_agents
        self._stopping = False
        self._clock = clock
        self._keystore = keystore
        self._front: GrpcFront | None = None
        self._ssh: SshAgentServer | None = None  # when [ssh] is on
        self._proxy: ProxyServer | None = None  # when [proxy] is on
        self._health: HealthServicer | None = None
        self._monitor: HealthMonitor | None = None
        self._clock_watch: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.agents: AgentRegistry | None = None
        self.policy: PolicyHolder | None = None
        self._audit: AuditLog | None = None
        # The tpm backend signs on a thread (~200 ms per signature on real
        # hardware); PKCS#11 inline (~65 µs on SoftHSM). See SigningRunner.
        self._signing = SigningRunner(off_loop=config.backend == "tpm")
        # Already held when `badged dev` locked the state dir before starting swtpm.
        self._lock_fd = state_lock_fd
        # [metrics]: off by default; when on, see badged.metrics.
        # Imported only when on: prometheus_client costs ~30 ms of start-up.
        self.metrics: Metrics | None = None
        if config.metrics_enabled:
            from badged.metrics import Metrics
            self.metrics = Metrics()
        self._denials = DenialCounter()  # repeated denials become counted records (issue 16)
        self._status: StatusList | None = None  # its journal's last lines are written at stop
        self._tasks: set[asyncio.Task[None]] = set()
        # Static secrets for the proxy's routes (badged.proxy.secretstore).
        self.proxy_secrets: SecretStore | None = None

    # -- build -------------------------------------------------------------------

    def _build(self) -> ServiceDeps:
        cfg = self.config
        check_dir_safe(cfg.state_dir, private=False) if cfg.state_dir.exists() else \
            cfg.state_dir.mkdir(mode=0o755, parents=True)
        ensure_private_dir(cfg.private_dir)
        self._lock_state_dir()
        if cfg.proxy_socket is not None:
            # aiohttp (~0.25 s of imports) while the PKCS#11 prefetch thread is
            # still in C_Initialize (~1.2 s with 1,000 agents on SoftHSM), not
            # after the key store is up: start() would import it on the
            # critical path (issue 22).
            import badged.proxy.server  # noqa: F401
        if self._keystore is None:
            self._keystore = open_keystore(cfg.backend, cfg.keystore)
        # Loaded before anything else is touched: a corrupt registry refuses
        # the start with nothing changed (ConfigError names the file).
        self.agents = AgentRegistry(
            store=AgentStore(cfg.private_dir / "agents.json"), keystore=self._keystore,
            clock=self._clock, trust_domain=cfg.trust_domain, max_token_ttl=cfg.max_ttl)
        # With the SSH agent socket on, every new key version gets an ssh key.
        self.agents.ssh_keys = cfg.ssh_socket is not None
        # The start-up check's parse when the file is unchanged (one parse, not two).
        policy = (checked_policy(cfg.policy_file) or load_policy(cfg.policy_file)
                  if cfg.policy_file else Policy.empty())
        if not policy.agents:
            _logger.warning("policy grants nothing (deny by default)",
                            extra={"policy": str(cfg.policy_file)})
        self.policy = PolicyHolder(policy, cfg.policy_file)
        from badged.proxy.secretstore import SecretStore

        # Sealed proxy secrets: a corrupt file refuses the start, nothing changed.
        self.proxy_secrets = SecretStore(cfg.private_dir / "proxy-secrets.json",
                                         self._keystore, clock=self._clock)
        device_key, device_created = self._device_key(self._keystore)
        self._publish_device_key(device_key)
        # Refuses to start (ConfigError) on an unusable audit dir: no unaudited service.
        mirror = None
        if cfg.audit_syslog:
            from badged.audit.mirror import syslog_mirror

            mirror = syslog_mirror()
        fsync: Callable[[int], None] = os.fsync
        if cfg.unsafe_audit_no_fsync:
            from badged.audit.log import unsafe_no_fsync

            _logger.warning("UNSAFE: audit records are not fsync'd (benchmark mode); "
                            "acknowledged credentials may be unaudited after a power loss")
            fsync = unsafe_no_fsync
        if self.metrics is not None:  # counted from the durable records
            from badged.metrics import combine_mirrors
            mirror = combine_mirrors(mirror, self.metrics.observe_audit)
            fsync = self.metrics.timed_fsync(fsync)
        audit = AuditLog.open(AuditConfig(directory=cfg.effective_audit_dir,
                                          durability=cfg.audit_durability,
                                          sync_delay=cfg.audit_sync_delay_ms / 1000,
                                          retain_bytes=cfg.audit_retain_bytes,
                                          retain_days=float(cfg.audit_retain_days),
                                          export_dir=cfg.audit_export_dir),
                              clock=self._clock,
                              signer=device_key, mirror=mirror, fsync=fsync)
        self._audit = audit
        audit.start_retention(asyncio.get_running_loop())  # [audit] retain_*: off the hot path
        if device_created:
            audit.append_sync({"event": "key.created", "key": DEVICE_KEY, "reason": "device key"})
        # Start-up reconcile, now that every step it takes can be audited.
        # It never destroys a key the registry does not name: such keys make
        # it refuse the start (UnregisteredKeysError, `badged recover`).
        self.agents.set_audit(audit.append_sync)
        audit_dir = cfg.effective_audit_dir
        try:
            self.agents.reconcile(lambda op: {str(r.get("event")) for r in
                                              find_marked(audit_dir, op) if r.get("op") == op})
        except BadgedError as exc:
            with contextlib.suppress(BadgedError, OSError, ValueError):
                audit.append_sync({"event": "daemon.refused", "reason": str(exc)[:1000]})
            raise
        self.session_keys: SessionKeyManager | None = None
        session_file = cfg.private_dir / "session-keys.json"
        session_mode = cfg.effective_signing_mode == "session"
        if session_mode or session_file.exists():
            # Session mode: tokens are signed by in-memory keys the hardware key
            # certifies. Direct mode after session mode: keep publishing the
            # session keys whose tokens are still live, sign with the hardware.
            loop = asyncio.get_running_loop()
            self.session_keys = SessionKeyManager(
                self.agents, clock=self._clock, issuer=cfg.effective_issuer,
                schedule=Schedule(period=cfg.session_key_period, max_ttl=cfg.max_ttl),
                persist_path=session_file, scheduler=loop.call_later, audit=audit.append_sync,
                background=lambda fn: loop.run_in_executor(None, fn), signing=session_mode)
            if not session_mode and not self.session_keys.publishes_any:
                self.session_keys = None
        # Issue 21: the Token Status List tokens point at (badged.statuslist).
        status = StatusList(cfg.private_dir / "status", clock=self._clock,
                            uri=cfg.effective_issuer.rstrip("/") + "/status-list",
                            # power loss: tokens the journal lost, from the audit log
                            issued_since=issued_from_audit(cfg.effective_audit_dir),
                            max_ttl=cfg.max_ttl)
        self._status = status
        if status.reconciled:
            # A start-up state change like any other: on the record, not only in the log.
            audit.append_sync({"event": "status_list.reconciled", "restored": status.reconciled,
                               "reason": "tokens missing from the journal (power loss) restored "
                                         "from their token.issued records"})
        return ServiceDeps(
            agents=self.agents, policy=self.policy, peers=PeerRegistry(),
            attestor=ProcessAttestor(), audit=self._denials.wrap(audit), clock=self._clock,
            new_jti=_new_jti,
            issuer=cfg.effective_issuer, default_ttl=cfg.default_ttl, max_ttl=cfg.max_ttl,
            admin_uids=frozenset({0, os.geteuid()}), operator_gid=cfg.operator_gid(),
            device_key=device_key, keystore=self._keystore, state_dir=cfg.state_dir,
            grants=GrantStore(cfg.private_dir / "grants.json", self._clock),
            limiter=RateLimiter(),
            approvals=ApprovalBoard(clock=self._clock, timeout=cfg.approval_timeout),
            trust_domain=cfg.trust_domain, token_keys=self.session_keys,
            signing=self._signing,
            ssh_ca=SshCa(load_ca_key(cfg.ssh_ca_key)) if cfg.ssh_ca_key is not None else None,
            status=status,
        )

    def _publish_device_key(self, key: KeyHandle) -> None:
        """Write the device public key for offline audit verification.

        Convenience only: verifiers should pin this key out of band (e.g. from
        the enrollment certificate), since whoever can write the state dir
        could also replace this file.
        """
        from cryptography.hazmat.primitives import serialization

        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        atomic_write(self.config.state_dir / "device-key.pem", pem, mode=0o644)

    @staticmethod
    def _device_key(keystore: KeyStore) -> tuple[KeyHandle, bool]:
        """The device key, generated in the token on first start (True: just made).

        It signs the audit log's checkpoints, so it exists before the log is
        open; its creation is audited as the log's first act.
        """
        try:
            return keystore.get(DEVICE_KEY), False
        except KeyNotFoundError:
            _logger.info("generating device key", extra={"key": DEVICE_KEY})
            return keystore.generate(DEVICE_KEY), True

    def _lock_state_dir(self) -> None:
        if self._lock_fd < 0:
            self._lock_fd = lock_state_dir(self.config)

    # -- run -----------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        try:
            deps = self._build()
        except BaseException:
            self._close_after_failed_start()
            raise
        assert self.agents is not None
        for name in self._ensure_agents:
            if not any(a.name == name for a in self.agents.list(include_revoked=True)):
                self.agents.create(name, "created by badged dev")
        if cfg.ssh_socket is not None:
            # Agents made before [ssh] was on get their SSH key now (audited).
            added = self.agents.ensure_ssh_keys()
            if added:
                _logger.info("ssh keys created", extra={"agents": added})
        for sock in (cfg.workload_socket, cfg.admin_socket):
            _prepare_socket_dir(sock.parent)
        # No private gRPC socket: the front terminates HTTP/2 itself. A stale
        # one from an older version is removed so nothing mistakes it for live.
        stale = cfg.private_dir / "grpc.sock"
        if stale.exists():
            stale.unlink()
        table = MethodTable()
        server = table.as_server
        workload_pb2_grpc.add_WorkloadServiceServicer_to_server(WorkloadServicer(deps), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(deps), server)
        from badged.service import credentials, enroll
        credentials.add_to_server(server, deps)
        enroll.add_to_server(server, deps)
        if self.proxy_secrets is not None:  # badgectl secret, on the admin socket
            from badged.proxy import admin as proxy_admin
            proxy_admin.add_to_server(server, deps, self.proxy_secrets)
        self._health = HealthServicer()
        spiffe_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(SpiffeWorkloadServicer(deps), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self.metrics is not None:  # badgectl metrics, on the admin socket
            self.metrics.add_to_server(server, deps)
        install_refusal_log_limits()
        methods = await table.intercepted(
            ([self.metrics.interceptor()] if self.metrics is not None else [])
            + [ErrorBoundary(log_details=cfg.log_error_details, audit=deps.audit)])
        policy_holder = self.policy
        assert policy_holder is not None
        front = GrpcFront(registry=deps.peers, methods=methods,
                          max_per_uid=cfg.max_connections_per_uid, max_message=MAX_MESSAGE,
                          limits=replace(cfg.front_limits, max_message=MAX_MESSAGE),
                          is_bound=Classifier(lambda: policy_holder.current, deps.admin_uids))
        self._front = front
        if self._audit is not None:
            # A lone call writes its audit record on the loop thread (no
            # thread hand-offs); concurrent calls share the writer's fsyncs,
            # and with several in flight the writer gathers (COMMIT_DELAY_S).
            self._audit.solo = front.solo
            self._audit.in_flight = front.calls_in_flight
        # Under load, PKCS#11 signatures are gathered and made back to back.
        self._signing.in_flight = front.calls_in_flight
        gid = cfg.operator_gid()
        await front.serve(cfg.workload_socket, channel="workload", mode=0o666)
        await front.serve(cfg.admin_socket, channel="admin",
                          mode=0o660 if gid is not None else 0o600, group=gid)
        if cfg.ssh_socket is not None:
            _prepare_socket_dir(cfg.ssh_socket.parent)
            self._ssh = SshAgentServer(deps, cfg.ssh_socket,
                                       max_per_uid=cfg.max_connections_per_uid,
                                       idle_timeout=cfg.front_limits.idle_timeout,
                                       calls=front)
            await self._ssh.start()
        if cfg.proxy_socket is not None:
            await self._start_proxy(deps, cfg.proxy_socket)
        await self._start_health(deps)
        self._clock_watch = asyncio.get_running_loop().create_task(self._watch_clock())
        if self.metrics is not None:
            from badged.metrics import attach
            attach(self.metrics, front=front, audit=self._audit, keystore=self._keystore,
                   monitor=self._monitor)
            if cfg.metrics_listen is not None:
                await self.metrics.serve(cfg.metrics_listen, group=gid)
        await self._append_audit({"event": "daemon.started", "pid": os.getpid(),
                                  "config": cfg.source})
        _logger.info("ready", extra={"workload": str(cfg.workload_socket),
                                     "admin": str(cfg.admin_socket)})

    async def _start_proxy(self, deps: ServiceDeps, path: Path) -> None:
        """The credential proxy (docs/proxy.md): aiohttp is imported only when it is on."""
        from badged.proxy.server import ProxyServer

        _prepare_socket_dir(path.parent)
        self._proxy = ProxyServer(deps, path, max_per_uid=self.config.max_connections_per_uid,
                                  idle_timeout=self.config.front_limits.idle_timeout,
                                  secrets=self.proxy_secrets, calls=self._front)
        await self._proxy.start()

    def _close_after_failed_start(self) -> None:
        """A refused start still seals the audit log and closes the token."""
        if self._audit is not None:
            with contextlib.suppress(BadgedError, OSError, RuntimeError):
                self._audit.close()
            self._audit = None
        if self._keystore is not None:
            with contextlib.suppress(BadgedError, OSError):
                self._keystore.close()

    async def _start_health(self, deps: ServiceDeps) -> None:
        """Per-service health from what issuing needs (badged.health), polled."""
        audit, policy, health = self._audit, self.policy, self._health
        assert audit is not None and policy is not None and health is not None
        assert self._keystore is not None

        def policy_problem() -> str | None:
            return None if policy.current.agents else "the policy lets no agent be used"

        self._monitor = HealthMonitor(
            audit_dir=audit.directory, audit_log_problem=lambda: audit.problem,
            audit_counts=lambda: (audit.stats.records, audit.stats.failed),
            keystore=self._keystore, policy_problem=policy_problem, publish=health.publish)
        await self._monitor.poll()
        self._monitor.start()

    async def _watch_clock(self, every: float = 1.0) -> None:
        """Audit wall-clock steps (compared with the monotonic clock every second).

        Nothing needs fixing when one happens -- budgets, grants, delegations
        and timers count on the monotonic clock -- but claims and records carry
        wall time, so an auditor must see where it jumped. Session keys are
        swept at once: their ``use_until`` is wall time (docs/time.md).
        """
        detector = StepDetector(self._clock)
        while True:
            await asyncio.sleep(every)
            delta = detector.check()
            if delta is None:
                continue
            _logger.warning("wall clock stepped", extra={"delta_seconds": round(delta, 3)})
            if self.session_keys is not None:
                self.session_keys.sweep()
            try:
                await self._append_audit({"event": "clock.stepped",
                                          "delta_seconds": round(delta, 3)})
            except BadgedError as exc:  # the audit log's own failure is health's job
                _logger.error("clock step not audited", extra={"error": str(exc)})

    async def _append_audit(self, event: Mapping[str, object]) -> None:
        if self._audit is not None:
            await self._audit.append(event)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop_from_signal)
        loop.add_signal_handler(signal.SIGINT, self._stop_from_signal)
        loop.add_signal_handler(signal.SIGHUP, self.reload_policy)

    def _stop_from_signal(self) -> None:
        """Stop in a task we keep and whose outcome we read.

        A bare ``create_task(self.stop())`` drops the task: any error in it
        (a poisoned audit log failing the ``daemon.stopped`` record) ended as
        "Task exception was never retrieved" on stderr at exit.
        """
        task = asyncio.get_running_loop().create_task(self.stop())
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _logger.error("background task failed: %s", task.exception())

    def reload_policy(self) -> None:
        """SIGHUP: reload, and audit the outcome like `badgectl policy reload`."""
        if self.policy is None:
            return
        error = self.policy.try_reload()
        event = {"event": "policy.reloaded" if error is None else "policy.rejected",
                 "trigger": "SIGHUP", "policy": str(self.policy.path),
                 "error": str(error) if error else None}
        task = asyncio.get_running_loop().create_task(self._append_audit(event))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def stop(self, grace: float = 5.0) -> None:
        if self._stopping:  # SIGTERM and SIGINT may both arrive
            await self._stopped.wait()
            return
        self._stopping = True
        _logger.info("shutting down")
        if self._clock_watch is not None:
            self._clock_watch.cancel()
        if self._monitor is not None:
            await self._monitor.stop()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.metrics is not None:
            await self.metrics.close()
        if self._ssh is not None:
            await self._ssh.close()
        if self._proxy is not None:
            await self._proxy.close()
        if self._front is not None:
            await self._front.stop_accepting()
            await self._front.drain(grace)
            self._front.close_links()
        if self._status is not None:
            try:
                self._status.flush()  # batched journal lines (badged.statuslist)
            except OSError as exc:  # start-up reconciles them from the audit log
                _logger.error("status list journal not flushed: %s", exc)
        try:
            await self._append_audit({"event": "daemon.stopped", "pid": os.getpid()})
        except BadgedError as exc:
            # A poisoned or full audit log: the stop goes on (it must), and
            # says so once instead of raising out of a signal-handler task.
            _logger.error("daemon.stopped not audited: %s", exc)
        finally:
            if self._audit is not None:
                await self._denials.aclose()  # counts of repeated denials still pending
                await self._audit.aclose()  # signs a final checkpoint
            self._signing.close()  # after the front drained: no signature in flight
            if self._keystore is not None:
                self._keystore.close()
            self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()
