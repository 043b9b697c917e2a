"""Daemon configuration: typed, frozen, validated at load.

Precedence: defaults, then the TOML file, then command-line flags (applied by
``__main__``). The PIN is never in this file: the token URI names a
``pin-source`` file instead. See docs/badged.example.toml for every key.
"""

from __future__ import annotations

import grp
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from badged.errors import ConfigError
from badged.keystore.pkcs11.store import Pkcs11Config
from badged.keystore.tpm.store import TpmConfig
from badged.keystore.uri import parse_pkcs11_uri
from badged.policy.loader import parse_duration

DEFAULT_SOCKET_DIR = Path("/run/badged")
DEFAULT_STATE_DIR = Path("/var/lib/badged")
SIGNING_MODES = ("direct", "session")
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

    def operator_gid(self) -> int | None:
        if self.operator_group is None:
            return None
        try:
            return grp.getgrnam(self.operator_group).gr_gid
        except KeyError:
            raise ConfigError(f"operator_group {self.operator_group!r} does not exist",
                              path=self.source) from None


_KNOWN: dict[str, set[str]] = {
    "daemon": {"state_dir", "workload_socket", "admin_socket", "operator_group", "trust_domain",
               "issuer", "policy_file", "default_ttl", "max_ttl", "max_connections_per_uid",
               "approval_timeout"},
    "log": {"format", "level", "error_details"},
    "keystore": {"backend", "uri", "module_path", "tcti", "key_dir", "parent_handle",
                 "key_auth_file", "signing_mode", "session_key_period", "session_key_copies"},
    "audit": {"dir", "syslog"},
}


def _line_of(text: str, section: str, key: str | None) -> int | None:
    lines = text.splitlines()
    in_section = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            in_section = stripped.strip("[] ") == section
            if in_section and key is None:
                return i + 1
            continue
        if in_section and key and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return i + 1
    return None


def load_config(path: Path) -> DaemonConfig:
    """Parse and validate; every error names the file and line."""
    src = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", path=src) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"TOML syntax: {exc}", path=src, line=int(m.group(1)) if m else None) from None

    def fail(section: str, key: str | None, msg: str) -> ConfigError:
        return ConfigError(msg, path=src, line=_line_of(text, section, key))

    for section, body in doc.items():
        if section not in _KNOWN:
            raise fail(section, None, f"unknown section [{section}]")
        if not isinstance(body, dict):
            raise ConfigError(f"{section} must be a table", path=src)
        for key in body:
            if key not in _KNOWN[section]:
                raise fail(section, key, f"unknown key {key!r} in [{section}]")

    d = doc.get("daemon", {})
    log = doc.get("log", {})
    ks = doc.get("keystore", {})
    audit = doc.get("audit", {})

    def path_opt(section: str, key: str, value: Any) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.startswith("/"):
            raise fail(section, key, f"{key} must be an absolute path")
        return Path(value)

    def duration(key: str, default: int) -> int:
        try:
            return parse_duration(d.get(key, default), what=key)
        except ValueError as exc:
            raise fail("daemon", key, str(exc)) from None

    backend = ks.get("backend", "pkcs11")
    keystore: Pkcs11Config | TpmConfig
    if backend == "pkcs11":
        uri = ks.get("uri")
        if not isinstance(uri, str):
            raise fail("keystore", "uri" if "uri" in ks else None, "[keystore] uri is required")
        try:
            parse_pkcs11_uri(uri)
        except ConfigError as exc:
            raise fail("keystore", "uri", exc.detail) from None
        for key in ("tcti", "key_dir", "parent_handle", "key_auth_file"):
            if key in ks:
                raise fail("keystore", key, f"{key} is a tpm setting; backend is pkcs11")
        copies = ks.get("session_key_copies", True)
        if not isinstance(copies, bool):
            raise fail("keystore", "session_key_copies", "session_key_copies must be true or false")
        keystore = Pkcs11Config(uri=uri, module_path=ks.get("module_path"),
                                session_key_copies=copies)
    elif backend == "tpm":
        tcti = ks.get("tcti")
        if not isinstance(tcti, str) or not tcti:
            raise fail("keystore", "tcti" if "tcti" in ks else None,
                       "[keystore] tcti is required for the tpm backend (e.g. device:/dev/tpmrm0)")
        for key in ("uri", "module_path", "session_key_copies"):
            if key in ks:
                raise fail("keystore", key, f"{key} is a pkcs11 setting; backend is tpm")
        parent = ks.get("parent_handle")
        if parent is not None:
            try:
                parent = int(parent, 0) if isinstance(parent, str) else int(parent)
            except ValueError:
                raise fail("keystore", "parent_handle", "parent_handle must be like 0x81000001") from None
        key_dir = path_opt("keystore", "key_dir", ks.get("key_dir"))
        auth = path_opt("keystore", "key_auth_file", ks.get("key_auth_file"))
        state = path_opt("daemon", "state_dir", d.get("state_dir")) or DEFAULT_STATE_DIR
        keystore = TpmConfig(tcti=tcti, key_dir=str(key_dir or state / "private" / "tpm-keys"),
                             parent_handle=parent, key_auth_file=str(auth) if auth else None)
    else:
        raise fail("keystore", "backend", f"unknown keystore backend {backend!r} (known: pkcs11, tpm)")
    signing_mode = ks.get("signing_mode")
    if signing_mode is not None and signing_mode not in SIGNING_MODES:
        raise fail("keystore", "signing_mode", "signing_mode must be 'direct' or 'session'")
    try:
        session_period = parse_duration(ks.get("session_key_period", 300), what="session_key_period")
    except ValueError as exc:
        raise fail("keystore", "session_key_period", str(exc)) from None
    if not MIN_SESSION_PERIOD <= session_period <= MAX_SESSION_PERIOD:
        raise fail("keystore", "session_key_period",
                   f"session_key_period must be {MIN_SESSION_PERIOD}s..{MAX_SESSION_PERIOD}s")
    fmt = log.get("format", "text")
    if fmt not in ("text", "json"):
        raise fail("log", "format", "log format must be 'text' or 'json'")
    max_conn = d.get("max_connections_per_uid", 256)
    if not isinstance(max_conn, int) or not 1 <= max_conn <= 65536:
        raise fail("daemon", "max_connections_per_uid", "must be an integer in 1..65536")
    td = d.get("trust_domain", "example.org")
    if not isinstance(td, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{0,252}", td):
        raise fail("daemon", "trust_domain", "trust_domain must be a lowercase DNS-like name")
    cfg = DaemonConfig(
        state_dir=path_opt("daemon", "state_dir", d.get("state_dir")) or DEFAULT_STATE_DIR,
        workload_socket=path_opt("daemon", "workload_socket", d.get("workload_socket"))
        or DEFAULT_SOCKET_DIR / "agent.sock",
        admin_socket=path_opt("daemon", "admin_socket", d.get("admin_socket"))
        or DEFAULT_SOCKET_DIR / "admin.sock",
        operator_group=d.get("operator_group"),
        trust_domain=td,
        issuer=d.get("issuer"),
        policy_file=path_opt("daemon", "policy_file", d.get("policy_file")),
        audit_dir=path_opt("audit", "dir", audit.get("dir")),
        audit_syslog=bool(audit.get("syslog", False)),
        default_ttl=duration("default_ttl", 300),
        max_ttl=duration("max_ttl", 3600),
        max_connections_per_uid=max_conn,
        approval_timeout=duration("approval_timeout", 120),
        log_format=fmt,
        log_level=str(log.get("level", "INFO")).upper(),
        log_error_details=bool(log.get("error_details", True)),
        keystore=keystore,
        signing_mode=signing_mode,
        session_key_period=session_period,
        source=src,
    )
    if cfg.default_ttl > cfg.max_ttl:
        raise fail("daemon", "default_ttl", "default_ttl must not exceed max_ttl")
    return cfg
