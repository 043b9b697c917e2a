"""``badged``: the daemon's command line.

    badged --config /etc/badged/badged.toml     # production (docs/deploy.md)
    badged dev --state-dir /tmp/badged-demo     # embedded default (SoftHSM)
    badged dev --state-dir /tmp/b --backend tpm # throwaway swtpm, session-key mode
    badged check --config FILE [--online]       # validate everything, exit
    badged recover --config FILE --adopt        # when start-up refused (docs/audit.md)

Exit codes: 0 stopped cleanly; 2 refused to start (config, permissions,
token); 1 failed after it was ready. Every start-up failure is one line
``badged: WHAT: why`` on stderr, never a traceback: systemd's
``RestartPreventExitStatus=2`` then stops a restart loop that could lock a
token with a wrong PIN.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

import click

from badged import logsetup, preflight, sdnotify
from badged.config import LOG_LEVELS, ConfigErrors, DaemonConfig, load_config
from badged.errors import BadgedError, ConfigError, KeyStoreAuthError

_logger = logging.getLogger("badged.main")
EXIT_START_FAILED = 2
PROCESS_NAME = b"badged"


class StartupFailed(Exception):
    """Start-up stopped with one operator-facing line (already cleaned up)."""


def _die(line: str) -> NoReturn:
    click.echo(f"badged: {line}", err=True)
    sys.exit(EXIT_START_FAILED)


def _describe(config: DaemonConfig | None, exc: BaseException) -> str:
    """One line for any start-up failure: what failed and why, never a traceback."""
    if isinstance(exc, KeyStoreAuthError) and config is not None:
        return preflight.auth_failure(config, exc).line()
    if isinstance(exc, ConfigErrors) and len(exc.errors) > 1:
        more = len(exc.errors) - 1
        return f"{exc} (and {more} more error{'s' * (more > 1)}: badged check --config {exc.path})"
    if isinstance(exc, BadgedError):
        if config is not None and exc.code.value.startswith("backend"):
            return f"{preflight.describe_keystore(config)}: {exc}"
        return str(exc)
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "start-up"
        return f"{where}: {exc.strerror or exc}"
    return f"start-up failed: {type(exc).__name__}: {exc}"


# Set once every start-up check has passed: only then may the prefetch thread
# log into the token (a refused PIN counts against its retry limit).
_CHECKS_PASSED = threading.Event()


def _prefetch_module(config: DaemonConfig) -> None:
    """Load the PKCS#11 module on a thread: its C_Initialize overlaps what follows.

    Once the checks have passed (``_CHECKS_PASSED``), the same thread logs in,
    lists the token's keys and finds the device key, while this thread imports
    the rest of the daemon: with 1,000 agents these are two walks of 6,000
    token objects that otherwise came after the imports (issue 22).
    """
    config.apply_module_env()  # before the key-store library is first loaded
    if config.backend == "pkcs11":
        from badged.keystore.pkcs11.store import prefetch
        from badged.keystore.port import DEVICE_KEY
        prefetch(config.keystore, login_after=_CHECKS_PASSED, preload=(DEVICE_KEY,))


MAX_WARNINGS_LOGGED = 20


def _preflight(config: DaemonConfig) -> None:
    """Refuse to start on any fatal problem, before the token is logged into or state touched.

    The module's C_Initialize may run (no login) once every check but the
    policy's passed: it overlaps the policy check.
    """
    problems = preflight.offline(config, before_policy=lambda: _prefetch_module(config))
    fatal = [p for p in problems if p.fatal]
    warnings = [p for p in problems if not p.fatal]
    # A policy shared between hosts can name thousands of absent users: a
    # line each made 10,000 rules log 5,000 lines at every start (issue 22).
    for p in warnings[:MAX_WARNINGS_LOGGED]:
        _logger.warning(p.line())
    if len(warnings) > MAX_WARNINGS_LOGGED:
        how = (f": badged check --config {config.source}" if Path(config.source).is_file()
               else "")
        _logger.warning(f"and {len(warnings) - MAX_WARNINGS_LOGGED} more warnings{how}")
    if fatal:
        line = fatal[0].line()
        if len(fatal) > 1:
            how = (f": badged check --config {config.source}" if Path(config.source).is_file()
                   else "")
            line += f" (and {len(fatal) - 1} more{how})"
        raise StartupFailed(line)


def _set_process_name() -> None:
    """``badged`` in ps/top/pidof instead of ``python3`` (the thread's comm).

    prctl(PR_SET_NAME) names the calling thread; called first thing in main,
    it names the main thread, which is what pidof and ``ps -C`` read.
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(PROCESS_NAME), 0, 0, 0)  # PR_SET_NAME = 15
    except (OSError, AttributeError):
        pass


async def _serve(config: DaemonConfig, *, ensure_agent: str | None = None,
                 state_lock_fd: int = -1) -> None:
    from badged.app import Daemon

    daemon = Daemon(config, ensure_agents=(ensure_agent,) if ensure_agent else (),
                    state_lock_fd=state_lock_fd)
    try:
        await daemon.start()
    except Exception as exc:
        line = _describe(config, exc)
        _logger.debug("start-up failed", exc_info=True)
        try:
            # Remove what was made before the failure (bound sockets), close the token.
            await daemon.stop(grace=0)
        except Exception:  # the first failure is the one to report
            _logger.debug("clean-up after failed start-up failed", exc_info=True)
        raise StartupFailed(line) from None
    loop = asyncio.get_running_loop()
    daemon.install_signal_handlers()

    stop_tasks: set[asyncio.Task[None]] = set()

    def stopping() -> None:
        sdnotify.notify("STOPPING=1")
        task = loop.create_task(daemon.stop())
        stop_tasks.add(task)
        task.add_done_callback(stop_tasks.discard)

    # The daemon's own handlers, plus the stopping notification for systemd.
    loop.add_signal_handler(signal.SIGTERM, stopping)
    loop.add_signal_handler(signal.SIGINT, stopping)
    # Everything built at start-up (modules, protobuf descriptors, policy,
    # caches) lives for the daemon's life: move it out of the collector's
    # reach so a full collection no longer walks it in the middle of a call
    # (these pauses were the p99 tail at 16 clients), and collect the young
    # generation less often: a request allocates a few hundred objects.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)
    # One line on stdout that scripts can wait for; logs go to stderr.
    print(f"badged ready workload={config.workload_socket} admin={config.admin_socket}",
          flush=True)
    sdnotify.notify("READY=1", f"MAINPID={os.getpid()}",
                    f"STATUS=serving {config.workload_socket}")
    await daemon.wait()


def _run(config: DaemonConfig, *, ensure_agent: str | None = None, state_lock_fd: int = -1) -> None:
    logsetup.configure(config.log_format, config.log_level)
    try:
        _preflight(config)
        _prefetch_module(config)  # started already unless the check skipped it (idempotent)
        _CHECKS_PASSED.set()
        asyncio.run(_serve(config, ensure_agent=ensure_agent, state_lock_fd=state_lock_fd))
    except StartupFailed as exc:
        _die(str(exc))
    except BadgedError as exc:
        _die(_describe(config, exc))


@click.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              envvar="BADGED_CONFIG",
              help="TOML config [env BADGED_CONFIG]; every key is explained in the example "
                   "shipped with the package: badged example-config")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Overrides [log] format.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
              help="Overrides [log] level.")
@click.version_option(package_name="badged", prog_name="badged")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, log_format: str | None,
        log_level: str | None) -> None:
    """badged: hardware-bound identities for AI agents.

    Production: badged --config /etc/badged/badged.toml (docs/deploy.md).
    """
    ctx.ensure_object(dict)
    ctx.obj["log_format"] = log_format
    ctx.obj["log_level"] = log_level.upper() if log_level else None
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("give --config FILE, or use `badged dev --state-dir DIR`")
    try:
        config = load_config(config_path).with_overrides(log_format=log_format,
                                                         log_level=ctx.obj["log_level"])
    except BadgedError as exc:
        _die(_describe(None, exc))
    _run(config)


@cli.command()
@click.option("--state-dir", type=click.Path(path_type=Path), required=True,
              help="Where the throwaway token, state and sockets live.")
@click.option("--agent", default="demo-agent", show_default=True,
              help="Demo agent bound to the invoking user.")
@click.option("--trust-domain", default="example.org", show_default=True)
@click.option("--approval-timeout", type=click.IntRange(1, 3600), default=120, show_default=True,
              help="Seconds a request waits for a human approval before it is denied.")
@click.option("--unsafe-audit-no-fsync", is_flag=True, hidden=True,
              help="Benchmarks only: do not fsync audit records.")
@click.option("--audit-durability", type=click.Choice(["fsync", "write"]), default=None,
              help="[audit] durability: fsync (default; durable before the answer) or write "
                   "(written before the answer, synced within 50 ms; docs/audit.md).")
@click.option("--backend", type=click.Choice(["softhsm", "tpm"]), default="softhsm",
              show_default=True,
              help="Throwaway SoftHSM token, or a throwaway swtpm run for the daemon's lifetime.")
@click.option("--signing-mode", type=click.Choice(["direct", "session"]), default=None,
              help="Default: direct on softhsm, session on tpm (docs/tpm.md).")
@click.option("--metrics", "metrics", is_flag=True,
              help="Prometheus metrics: badgectl metrics (admin socket), and HTTP on "
                   "STATE_DIR/run/metrics.sock.")
@click.pass_context
def dev(ctx: click.Context, state_dir: Path, agent: str, trust_domain: str,
        approval_timeout: int, unsafe_audit_no_fsync: bool, audit_durability: str | None,
        backend: str, signing_mode: str | None, metrics: bool) -> None:
    """Run on a throwaway SoftHSM token or swtpm under STATE_DIR (development mode)."""
    from badged.dev import prepare

    try:
        setup = prepare(state_dir, agent=agent, trust_domain=trust_domain, backend=backend,
                        signing_mode=signing_mode)
    except BadgedError as exc:
        _die(_describe(None, exc))
    try:
        config = setup.config.with_overrides(log_format=ctx.obj.get("log_format"),
                                             log_level=ctx.obj.get("log_level"),
                                             approval_timeout=approval_timeout,
                                             unsafe_audit_no_fsync=unsafe_audit_no_fsync or None,
                                             audit_durability=audit_durability,
                                             metrics_enabled=metrics or None,
                                             metrics_listen=str(setup.config.workload_socket.parent
                                                                / "metrics.sock")
                                             if metrics else None)
        _run(config, ensure_agent=agent, state_lock_fd=setup.lock_fd)
    finally:
        setup.close()  # the dev swtpm lives exactly as long as the daemon


@cli.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              envvar="BADGED_CONFIG")
@click.option("--online", is_flag=True,
              help="Also log into the token (one login: a wrong PIN counts against its retries).")
def check(config_path: Path, online: bool) -> None:
    """Validate a config, its policy and everything they name; print every problem.

    Offline: types, paths, directory owners and modes, sockets, the operator
    group and the daemon user's membership, the PKCS#11 module (loadable),
    the PIN file (readable, 0600, owned), the policy. Run it as the daemon's
    user (sudo -u badged badged check ...): access is checked as the caller.
    Exit 0 when the daemon would start, 1 otherwise.
    """
    try:
        config = load_config(config_path)
    except ConfigErrors as exc:
        for err in exc.errors:
            click.echo(f"badged: {err}", err=True)
        sys.exit(1)
    except ConfigError as exc:
        click.echo(f"badged: {exc}", err=True)
        sys.exit(1)
    problems = preflight.offline(config)
    fatal = any(p.fatal for p in problems)
    if online and not fatal:
        problems += preflight.online(config)
        fatal = any(p.fatal for p in problems)
    for p in problems:
        click.echo(f"badged: {'' if p.fatal else 'warning: '}{p.line()}", err=True)
    if fatal:
        sys.exit(1)
    if config.policy_file is not None:
        from badged.policy.loader import load_policy

        policy = load_policy(config.policy_file)
        click.echo(f"{config.policy_file}: {len(policy.agents)} agent rule(s), "
                   f"{len(policy.bundles)} bundle(s) OK")
    if online:
        click.echo(f"{preflight.describe_keystore(config)}: login OK")
    click.echo(f"{config_path}: OK (checked as {preflight.checked_as()})")


@cli.command("example-config")
@click.option("--policy", is_flag=True, help="The example policy instead of the daemon config.")
def example_config(policy: bool) -> None:
    """Print the commented example config (every key, its default and why).

    Shipped inside the package, so an installed wheel has it without the
    source tree: badged example-config > /etc/badged/badged.toml
    """
    from importlib.resources import files

    name = "policy.example.toml" if policy else "badged.example.toml"
    click.echo(files("badged").joinpath("examples", name).read_text(), nl=False)


@cli.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="The daemon's TOML config.")
@click.option("--dev", "dev_state", type=click.Path(path_type=Path), default=None,
              help="Or: the state dir of `badged dev`.")
@click.option("--trust-domain", default="example.org", show_default=True,
              help="With --dev: the trust domain the dev daemon runs with.")
@click.option("--adopt", "mode", flag_value="adopt", default=None,
              help="Rebuild registry entries for unregistered keys from their labels and the "
                   "audit log.")
@click.option("--quarantine", "mode", flag_value="quarantine",
              help="Relabel unregistered keys to badged/quarantine/... (never destroyed).")
@click.option("--audit-move-aside", type=click.IntRange(min=1), default=None, metavar="SEQ",
              help="Move a damaged audit record a checkpoint had sealed, and what follows, "
                   "aside (audited; verify keeps reporting it).")
@click.option("--purge-quarantine", is_flag=True,
              help="Destroy quarantined keys (each destruction audited).")
def recover(config_path: Path | None, dev_state: Path | None, trust_domain: str,
            mode: str | None, audit_move_aside: int | None, purge_quarantine: bool) -> None:
    """Resolve what makes start-up refuse: unregistered keys, sealed audit damage.

    Run with the daemon stopped. Without an action flag it only reports.
    Exit 0 when start-up will succeed, 1 when keys are still unregistered,
    2 on an error.
    """
    from badged.recover import recover as run_recover

    logsetup.configure("text", "WARNING")
    if (config_path is None) == (dev_state is None):
        raise click.UsageError("give exactly one of --config FILE or --dev STATE_DIR")
    setup = None
    try:
        if dev_state is not None:
            from badged.dev import prepare_existing

            setup = prepare_existing(dev_state, trust_domain=trust_domain)
            config = setup.config
        else:
            assert config_path is not None
            config = load_config(config_path)
            config.apply_module_env()  # before the key-store library is first loaded
        if config.backend == "pkcs11":  # its C_Initialize overlaps our imports (issue 22)
            from badged.keystore.pkcs11.store import prefetch
            prefetch(config.keystore)
        result = run_recover(config, mode=mode, audit_move_aside=audit_move_aside,
                             purge_quarantine=purge_quarantine,
                             state_lock_fd=setup.lock_fd if setup is not None else -1)
    except BadgedError as exc:
        click.echo(f"badged: {exc}", err=True)
        sys.exit(2)
    finally:
        if setup is not None:
            setup.close()
    for line in result.lines():
        click.echo(line)
    if result.unregistered:
        click.echo("badged: keys without a registry entry remain: choose --adopt or --quarantine",
                   err=True)
        sys.exit(1)


def main() -> None:
    _set_process_name()
    os.umask(0o077)
    # The event loop, the audit writer and grpc's threads hand the GIL back
    # and forth on every request; with the default 5 ms switch interval a
    # thread returning from C (fsync, C_Sign) can wait a full interval
    # (FINDINGS §2). 0.5 ms measured +50 % durable appends at 16 clients.
    sys.setswitchinterval(0.0005)
    cli(obj={})


if __name__ == "__main__":
    main()
