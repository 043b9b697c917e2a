"""Daemon configuration: typed, frozen, validated at load.

Precedence: defaults, then the TOML file, then command-line flags (applied by
``__main__``). The PIN is never in this file: the token URI names a
``pin-source`` file instead. See docs/badged.example.toml for every key.
"""

from __future__ import annotations

import grp
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from badged.errors import ConfigError
from badged.keystore.pkcs11.store import Pkcs11Config
from badged.keystore.tpm.store import TpmConfig
from badged.keystore.uri import parse_pkcs11_uri
from badged.listener.budget import MAX_CONNECTIONS, Budget, FrontLimits, min_buffered
from badged.policy.loader import parse_duration

DEFAULT_SOCKET_DIR = Path("/run/badged")
DEFAULT_STATE_DIR = Path("/var/lib/badged")
SIGNING_MODES = ("direct", "session")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A session key signs for at most this long; 1 s exists for tests of rotation.
MIN_SESSION_PERIOD = 1
MAX_SESSION_PERIOD = 3600


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    workload_socket: Path = DEFAULT_SOCKET_DIR / "agent.sock"
    admin_socket: Path = DEFAULT_SOCKET_DIR / "admin.sock"
    operator_group: str | None = None
    trust_domain: str = "example.org"
    issuer: str | None = None
    policy_file: Path | None = None
    audit_dir: Path | None = None
    audit_syslog: bool = False
    # [audit] durability: "fsync" (durable before the answer) or "write"
    # (written before the answer, synced within audit_sync_delay_ms).
    audit_durability: str = "fsync"
    audit_sync_delay_ms: int = 50
    # [audit] retention (docs/audit.md "Retention"): 0 keeps forever.
    audit_retain_bytes: int = 0
    audit_retain_days: int = 0
    audit_export_dir: Path | None = None
    # Benchmarks only (set by `badged dev --unsafe-audit-no-fsync`, never from
    # a config file): acknowledged records may be lost on power failure.
    unsafe_audit_no_fsync: bool = False
    default_ttl: int = 300
    max_ttl: int = 3600
    max_connections_per_uid: int = 256
    approval_timeout: int = 120
    log_format: str = "text"
    log_level: str = "INFO"
    log_error_details: bool = True
    keystore: Pkcs11Config | TpmConfig = field(
        default_factory=lambda: Pkcs11Config(uri="pkcs11:token=badged"))
    # "direct": the hardware key signs every token; "session": it certifies a
    # short-lived in-memory key that does (docs/tpm.md). None: per backend.
    signing_mode: str | None = None
    session_key_period: int = 300
    # Environment the key-store library reads when it is loaded, e.g.
    # SOFTHSM2_CONF: set in this process before the module's first load, so a
    # non-root daemon can use its own token without a wrapper script.
    module_env: tuple[tuple[str, str], ...] = ()
    # Prometheus metrics (badgectl metrics, over the admin socket); off by
    # default. ``metrics_listen``: also an HTTP endpoint (a Unix socket path
    # or a loopback host:port); setting it turns metrics on.
    metrics_enabled: bool = False
    metrics_listen: str | None = None
    # [limits]: what any local caller can make the front hold (issue 16).
    front_limits: FrontLimits = field(default_factory=FrontLimits)
    # [ssh] socket: the OpenSSH agent socket (badged.sshagent); None = off.
    ssh_socket: Path | None = None
    # [ssh] ca_key: the operator's SSH CA private key (OpenSSH format) that
    # signs agents' short-lived user certificates (badged.sshagent.ca); None = off.
    ssh_ca_key: Path | None = None
    # [proxy] socket: the credential proxy (badged.proxy, docs/proxy.md); None = off.
    proxy_socket: Path | None = None
    source: str = "<defaults>"

    @property
    def backend(self) -> str:
        return "tpm" if isinstance(self.keystore, TpmConfig) else "pkcs11"

    @property
    def effective_signing_mode(self) -> str:
        """Session mode by default on a TPM (a real one signs ~5/s), direct on PKCS#11."""
        if self.signing_mode is not None:
            return self.signing_mode
        return "session" if self.backend == "tpm" else "direct"

    @property
    def private_dir(self) -> Path:
        return self.state_dir / "private"

    @property
    def effective_issuer(self) -> str:
        return self.issuer or f"spiffe://{self.trust_domain}/badged"

    @property
    def effective_audit_dir(self) -> Path:
        return self.audit_dir or self.state_dir / "audit"

    def with_overrides(self, **changes: Any) -> DaemonConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def apply_module_env(self) -> None:
        """Export ``[keystore] module_env`` before the key-store library loads.

        SoftHSM reads SOFTHSM2_CONF only at C_Initialize, i.e. at the first
        load in the process; setting it later has no effect.
        """
        for name, value in self.module_env:
            os.environ[name] = value

    def operator_gid(self) -> int | None:
        if self.operator_group is None:
            return None
        try:
            return grp.getgrnam(self.operator_group).gr_gid
        except KeyError:
            raise ConfigError(f"operator_group {self.operator_group!r} does not exist",
                              path=self.source) from None


class ConfigErrors(ConfigError):
    """Every error found in one config file; it reads as the first one.

    ``badged check`` prints all of them; the daemon refuses to start on the
    first (one line) and points at ``badged check`` for the rest.
    """

    def __init__(self, detail: str, *, path: str | None = None, line: int | None = None,
                 errors: Sequence[ConfigError] = ()) -> None:
        super().__init__(detail, path=path, line=line)
        self.errors: list[ConfigError] = list(errors) or [self]

    @classmethod
    def of(cls, errors: Sequence[ConfigError]) -> ConfigErrors:
        first = errors[0]
        exc = cls(first.detail, errors=errors)  # first.detail already names file:line
        exc.path, exc.line = first.path, first.line
        return exc


_KNOWN: dict[str, set[str]] = {
    "daemon": {"state_dir", "workload_socket", "admin_socket", "operator_group", "trust_domain",
               "issuer", "policy_file", "default_ttl", "max_ttl", "max_connections_per_uid",
               "approval_timeout"},
    "log": {"format", "level", "error_details"},
    "keystore": {"backend", "uri", "module_path", "module_env", "tcti", "key_dir", "parent_handle",
                 "key_auth_file", "signing_mode", "session_key_period", "session_key_copies",
                 "command_timeout"},
    "audit": {"dir", "syslog", "durability", "sync_delay_ms", "retain_bytes", "retain_days",
              "export_dir"},
    "metrics": {"enabled", "listen"},
    "ssh": {"socket", "ca_key"},
    "proxy": {"socket"},
    "limits": {"max_connections", "admin_connections", "streams_per_connection",
               "connection_buffer", "streams_per_uid", "handlers_per_uid", "buffered_per_uid",
               "unbound_connections_per_uid", "unbound_streams_per_uid",
               "unbound_handlers_per_uid", "unbound_buffered_per_uid", "preface_timeout",
               "body_timeout", "idle_timeout", "send_timeout"},
}
_TOML_TYPE = {bool: "true or false", int: "an integer", str: "a string",
              dict: "a table", list: "an array", float: "a number"}

T = TypeVar("T")


def _type_name(value: object) -> str:
    for typ, name in _TOML_TYPE.items():
        if type(value) is typ:
            return name
    return type(value).__name__


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """Line of ``key`` in ``[section]`` (or of the section header), for messages.

    ``[a.b]`` headers (nested tables) count as their own sections, so a key of
    ``[keystore.module_env]`` is found there and not reported at line 1.
    """
    lines = text.splitlines()
    in_section = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            header = stripped.split("#", 1)[0].strip().strip("[] ")
            in_section = header == section
            if in_section and key is None:
                return i + 1
            continue
        if in_section and key and re.match(rf'^"?{re.escape(key)}"?\s*=', stripped):
            return i + 1
    return None


def load_config(path: Path) -> DaemonConfig:
    """Parse and validate strictly; every error names the file and line.

    Types are checked, never coerced: ``syslog = "no"`` is an error, not True.
    All errors are collected (:class:`ConfigErrors`), so one ``badged check``
    run lists every mistake in the file.
    """
    src = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", path=src) from None
    except UnicodeDecodeError:
        raise ConfigError("config is not UTF-8 text", path=src) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"TOML syntax: {exc}", path=src, line=int(m.group(1)) if m else None) from None

    errors: list[ConfigError] = []

    def fail(section: str, key: str | None, msg: str) -> None:
        line = _line_of(text, section, key)
        if line is None and key is not None:
            line = _line_of(text, f"{section}.{key}", None)
        errors.append(ConfigError(msg, path=src, line=line))

    for section, body in doc.items():
        if section not in _KNOWN:
            fail(section, None, f"unknown section [{section}] (known: {', '.join(sorted(_KNOWN))})")
            continue
        if not isinstance(body, dict):
            errors.append(ConfigError(f"{section} must be a table ([{section}])", path=src))
            continue
        for key in body:
            if key not in _KNOWN[section]:
                fail(section, key, f"unknown key {key!r} in [{section}]")

    def table(name: str) -> dict[str, Any]:
        body = doc.get(name, {})
        return body if isinstance(body, dict) else {}

    d, log, ks, audit = table("daemon"), table("log"), table("keystore"), table("audit")
    metrics = table("metrics")

    def typed(section: dict[str, Any], sname: str, key: str, typ: type[T], default: T) -> T:
        value = section.get(key, default)
        if value is default:
            return default
        # bool is a subclass of int in Python, never in TOML: check exactly.
        if type(value) is not typ:
            fail(sname, key, f"{key} must be {_TOML_TYPE[typ]}, not {_type_name(value)} "
                             f"({value!r})")
            return default
        return value

    def choice(section: dict[str, Any], sname: str, key: str, options: tuple[str, ...],
               default: str, *, upper: bool = False) -> str:
        value = typed(section, sname, key, str, default)
        norm = value.upper() if upper else value
        if norm not in options:
            fail(sname, key, f"{key} must be one of {', '.join(options)}, not {value!r}")
            return default
        return norm

    def path_opt(section: dict[str, Any], sname: str, key: str) -> Path | None:
        value = section.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.startswith("/"):
            fail(sname, key, f"{key} must be an absolute path, not {value!r}")
            return None
        if "\0" in value or any(part == ".." for part in value.split("/")):
            fail(sname, key, f"{key} must be a plain absolute path (no '..')")
            return None
        return Path(value)

    def duration(section: dict[str, Any], sname: str, key: str, default: int) -> int:
        try:
            return parse_duration(section.get(key, default), what=key)
        except ValueError as exc:
            fail(sname, key, str(exc))
            return default

    state_dir = path_opt(d, "daemon", "state_dir") or DEFAULT_STATE_DIR
    backend = typed(ks, "keystore", "backend", str, "pkcs11")
    if backend not in ("pkcs11", "tpm"):
        fail("keystore", "backend", f"unknown keystore backend {backend!r} (known: pkcs11, tpm)")
        backend = "pkcs11"
    keystore: Pkcs11Config | TpmConfig
    timeout = ks.get("command_timeout", 3.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0.05 <= timeout <= 600:
        fail("keystore", "command_timeout", "command_timeout must be seconds, 0.05 to 600")
        timeout = 3.0
    timeout = float(timeout)
    if backend == "pkcs11":
        pkcs11_uri = "pkcs11:token=badged"
        for key in ("tcti", "key_dir", "parent_handle", "key_auth_file"):
            if key in ks:
                fail("keystore", key, f"{key} is a tpm setting; backend is pkcs11")
        uri = ks.get("uri")
        if not isinstance(uri, str):
            fail("keystore", "uri" if "uri" in ks else None,
                 "[keystore] uri is required (e.g. \"pkcs11:token=badged?pin-source=file:"
                 "/etc/badged/user.pin\")" if uri is None else
                 f"uri must be a string, not {_type_name(uri)}")
        else:
            try:
                parsed = parse_pkcs11_uri(uri)
            except ConfigError as exc:
                fail("keystore", "uri", exc.detail)
            else:
                # A missing pin-source is reported by preflight (badged check),
                # where the PIN file itself is checked.
                del parsed
                pkcs11_uri = uri
        module = path_opt(ks, "keystore", "module_path")
        copies = typed(ks, "keystore", "session_key_copies", bool, True)
        keystore = Pkcs11Config(uri=pkcs11_uri, module_path=str(module) if module else None,
                                session_key_copies=copies,
                                command_timeout=timeout)
    else:
        for key in ("uri", "module_path", "session_key_copies"):
            if key in ks:
                fail("keystore", key, f"{key} is a pkcs11 setting; backend is tpm")
        tcti = ks.get("tcti")
        if not isinstance(tcti, str) or not tcti:
            fail("keystore", "tcti" if "tcti" in ks else None,
                 "[keystore] tcti is required for the tpm backend (e.g. device:/dev/tpmrm0)")
            tcti = "device:/dev/tpmrm0"
        parent = ks.get("parent_handle")
        if parent is not None:
            try:
                if isinstance(parent, bool) or not isinstance(parent, str | int):
                    raise ValueError
                parent = int(parent, 0) if isinstance(parent, str) else int(parent)
                if not 0x81000000 <= parent <= 0x81FFFFFF:
                    raise ValueError
            except ValueError:
                fail("keystore", "parent_handle",
                     "parent_handle must be a persistent handle like \"0x81000001\"")
                parent = None
        key_dir = path_opt(ks, "keystore", "key_dir")
        auth = path_opt(ks, "keystore", "key_auth_file")
        keystore = TpmConfig(tcti=tcti, key_dir=str(key_dir or state_dir / "private" / "tpm-keys"),
                             parent_handle=parent, key_auth_file=str(auth) if auth else None,
                             command_timeout=timeout)
    env = ks.get("module_env", {})
    module_env: list[tuple[str, str]] = []
    if not isinstance(env, dict):
        fail("keystore", "module_env", "module_env must be a table, e.g. "
                                       "module_env = { SOFTHSM2_CONF = \"/etc/badged/softhsm2.conf\" }")
    else:
        for name, value in env.items():
            # Inline ({ A = "b" }) or as its own [keystore.module_env] table.
            sect, key = ("keystore.module_env", name) if _line_of(
                text, "keystore.module_env", name) else ("keystore", "module_env")
            if not _ENV_NAME.fullmatch(name):
                fail(sect, key, f"module_env: {name!r} is not an environment name")
            elif not isinstance(value, str) or "\0" in value:
                fail(sect, key, f"module_env: {name} must be a string")
            else:
                module_env.append((name, value))
    signing_mode: str | None = None
    if "signing_mode" in ks:
        signing_mode = ks["signing_mode"]
        if signing_mode not in SIGNING_MODES:
            fail("keystore", "signing_mode", "signing_mode must be 'direct' or 'session'")
            signing_mode = None
    session_period = duration(ks, "keystore", "session_key_period", 300)
    if not MIN_SESSION_PERIOD <= session_period <= MAX_SESSION_PERIOD:
        fail("keystore", "session_key_period",
             f"session_key_period must be {MIN_SESSION_PERIOD}s..{MAX_SESSION_PERIOD}s")
        session_period = 300
    fmt = choice(log, "log", "format", LOG_FORMATS, "text")
    level = choice(log, "log", "level", LOG_LEVELS, "INFO", upper=True)
    error_details = typed(log, "log", "error_details", bool, True)
    syslog = typed(audit, "audit", "syslog", bool, False)
    durability = choice(audit, "audit", "durability", ("fsync", "write"), "fsync")
    sync_delay_ms = typed(audit, "audit", "sync_delay_ms", int, 50)
    if not 1 <= sync_delay_ms <= 1000:
        fail("audit", "sync_delay_ms", "sync_delay_ms must be in 1..1000")
        sync_delay_ms = 50
    retain_bytes = typed(audit, "audit", "retain_bytes", int, 0)
    if retain_bytes < 0:
        fail("audit", "retain_bytes", "retain_bytes must be 0 (keep forever) or positive")
        retain_bytes = 0
    retain_days = typed(audit, "audit", "retain_days", int, 0)
    if not 0 <= retain_days <= 36500:
        fail("audit", "retain_days", "retain_days must be in 0..36500 (0: keep forever)")
        retain_days = 0
    max_conn = typed(d, "daemon", "max_connections_per_uid", int, 256)
    if not 1 <= max_conn <= 65536:
        fail("daemon", "max_connections_per_uid", "max_connections_per_uid must be in 1..65536")
        max_conn = 256
    front_limits = _front_limits(table("limits"), max_conn, fail)
    td = typed(d, "daemon", "trust_domain", str, "example.org")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{0,252}", td):
        fail("daemon", "trust_domain", "trust_domain must be a lowercase DNS-like name")
    group = typed(d, "daemon", "operator_group", str, "")
    issuer = typed(d, "daemon", "issuer", str, "")
    if "issuer" in d and isinstance(d["issuer"], str) and not issuer.strip():
        fail("daemon", "issuer", "issuer must not be empty")
    default_ttl = duration(d, "daemon", "default_ttl", 300)
    max_ttl = duration(d, "daemon", "max_ttl", 3600)
    if default_ttl > max_ttl:
        fail("daemon", "default_ttl", "default_ttl must not exceed max_ttl")
    metrics_on = typed(metrics, "metrics", "enabled", bool, False)
    listen = typed(metrics, "metrics", "listen", str, "") or None
    if listen is not None:
        from badged.metrics import parse_listen

        try:
            parse_listen(listen)
        except ConfigError as exc:
            fail("metrics", "listen", exc.detail)
            listen = None
    cfg = DaemonConfig(
        state_dir=state_dir,
        workload_socket=path_opt(d, "daemon", "workload_socket") or DEFAULT_SOCKET_DIR / "agent.sock",
        admin_socket=path_opt(d, "daemon", "admin_socket") or DEFAULT_SOCKET_DIR / "admin.sock",
        operator_group=group or None,
        trust_domain=td,
        issuer=issuer or None,
        policy_file=path_opt(d, "daemon", "policy_file"),
        audit_dir=path_opt(audit, "audit", "dir"),
        audit_syslog=syslog,
        audit_durability=durability,
        audit_sync_delay_ms=sync_delay_ms,
        audit_retain_bytes=retain_bytes,
        audit_retain_days=retain_days,
        audit_export_dir=path_opt(audit, "audit", "export_dir"),
        default_ttl=default_ttl,
        max_ttl=max_ttl,
        max_connections_per_uid=max_conn,
        approval_timeout=duration(d, "daemon", "approval_timeout", 120),
        log_format=fmt,
        log_level=level,
        log_error_details=error_details,
        keystore=keystore,
        signing_mode=signing_mode,
        session_key_period=session_period,
        module_env=tuple(module_env),
        front_limits=front_limits,
        metrics_enabled=metrics_on or listen is not None,
        metrics_listen=listen,
        ssh_socket=path_opt(table("ssh"), "ssh", "socket"),
        ssh_ca_key=path_opt(table("ssh"), "ssh", "ca_key"),
        proxy_socket=path_opt(table("proxy"), "proxy", "socket"),
        source=src,
    )
    if cfg.ssh_ca_key is not None and cfg.ssh_socket is None:
        fail("ssh", "ca_key", "[ssh] ca_key needs [ssh] socket (agents get SSH keys only then)")
    if cfg.ssh_socket is not None and cfg.ssh_socket in (cfg.workload_socket, cfg.admin_socket):
        fail("ssh", "socket", "[ssh] socket must differ from the workload and admin sockets")
    if cfg.proxy_socket is not None and cfg.proxy_socket in (
            cfg.workload_socket, cfg.admin_socket, cfg.ssh_socket):
        fail("proxy", "socket", "[proxy] socket must differ from the other sockets")
    if cfg.workload_socket == cfg.admin_socket:
        fail("daemon", "admin_socket", "admin_socket must differ from workload_socket")
    if errors:
        errors.sort(key=lambda e: (e.line is None, e.line or 0))
        raise ConfigErrors.of(errors)
    return cfg


def _front_limits(lim: dict[str, Any], max_conn: int,
                  fail: Callable[[str, str | None, str], None]) -> FrontLimits:
    """The [limits] section over FrontLimits' defaults; checked as the front checks them."""
    base = FrontLimits()

    def count(key: str, default: int, lo: int = 1, hi: int = 1 << 40) -> int:
        value = lim.get(key, default)
        if type(value) is not int or not lo <= value <= hi:
            fail("limits", key, f"{key} must be an integer in {lo}..{hi}, not {value!r}")
            return default
        return value

    def seconds(key: str, default: float) -> float:
        if key not in lim:
            return default
        try:
            return float(parse_duration(lim[key], what=key))
        except ValueError as exc:
            fail("limits", key, str(exc))
            return default

    max_connections = (count("max_connections", MAX_CONNECTIONS, 8, 1 << 20)
                       if "max_connections" in lim else None)
    bound = Budget(connections=max_conn,
                   streams=count("streams_per_uid", base.bound.streams),
                   handlers=count("handlers_per_uid", base.bound.handlers),
                   buffered=count("buffered_per_uid", max(
                       base.bound.buffered, min_buffered(max_conn, base))))
    unbound = Budget(
        connections=count("unbound_connections_per_uid", min(max_conn, base.unbound.connections)),
        streams=count("unbound_streams_per_uid", base.unbound.streams),
        handlers=count("unbound_handlers_per_uid", base.unbound.handlers),
        buffered=count("unbound_buffered_per_uid", base.unbound.buffered))
    limits = FrontLimits(
        max_message=base.max_message,
        conn_streams=count("streams_per_connection", base.conn_streams, 1, 1000),
        conn_buffer=count("connection_buffer", base.conn_buffer, 65535, 2**31 - 1),
        bound=bound, unbound=unbound,
        admin_connections=count("admin_connections", base.admin_connections, 1, 65536),
        max_connections=max_connections,
        preface_timeout=seconds("preface_timeout", base.preface_timeout),
        body_timeout=seconds("body_timeout", base.body_timeout),
        idle_timeout=seconds("idle_timeout", base.idle_timeout),
        send_timeout=seconds("send_timeout", base.send_timeout))
    try:
        limits.check()
    except ValueError as exc:
        fail("limits", None, f"[limits]: {exc}")
        return base
    return limits
