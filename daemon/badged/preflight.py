"""Start-up checks: everything that can be known before the daemon touches state.

``badged check`` prints every problem found here; the daemon runs the same
checks before it opens the token, so a mistake stops it *before* a device key
is generated, a socket is bound or an audit record is written -- and with one
line ``badged: WHAT: why`` instead of a traceback half-way through start-up.

Checks are made as the user running them: run ``badged check`` as the
daemon's user (``sudo -u badged badged check ...``) to see what it will see.
Nothing here creates, changes or deletes a file.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from badged.config import DaemonConfig
from badged.errors import BadgedError, ConfigError, KeyStoreAuthError
from badged.keystore.pkcs11.store import Pkcs11Config
from badged.keystore.tpm.store import TpmConfig
from badged.keystore.uri import parse_pkcs11_uri
from badged.policy.model import Policy
from badged.secrets import read_secret_file

# Longest path a Unix socket address holds (sun_path is 108 bytes with the NUL).
SOCKET_PATH_MAX = 107
LOCKOUT_WARNING = ("a restart loop with a wrong PIN can lock a real token (most lock after "
                   "3-10 failures); fix the PIN file before starting again")


@dataclass(frozen=True)
class Problem:
    """One finding: ``what`` names the object (a key, a file), ``why`` the fix."""

    what: str
    why: str
    fatal: bool = True

    def line(self) -> str:
        return f"{self.what}: {self.why}"


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _dir_problems(what: str, path: Path, *, private: bool, created_by: str) -> list[Problem]:
    """A directory the daemon writes: ours, not writable by others, writable by us.

    Missing is fine if we can create it (the daemon does, with the right mode);
    otherwise say who should (systemd's RuntimeDirectory=/StateDirectory=).
    """
    if not path.exists() and not path.is_symlink():
        parent = _nearest_existing(path.parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            return [Problem(what, f"{path} does not exist and {_user_name()} cannot create it "
                                  f"({parent} is not writable); {created_by}")]
        return []
    try:
        st = os.lstat(path)
    except OSError as exc:
        return [Problem(what, f"{path}: {exc.strerror}")]
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return [Problem(what, f"{path} is not a directory (or is a symlink)")]
    out: list[Problem] = []
    if st.st_uid != os.geteuid():
        out.append(Problem(what, f"{path} is owned by uid {st.st_uid}, not by the daemon's user "
                                 f"{_user_name()} (uid {os.geteuid()}); chown it"))
    mode = stat.S_IMODE(st.st_mode)
    if private and mode & 0o077:
        out.append(Problem(what, f"{path} has mode {mode:04o}; it must be 0700"))
    elif mode & 0o022:
        out.append(Problem(what, f"{path} has mode {mode:04o}, writable by others; use 0755"))
    if not os.access(path, os.W_OK | os.X_OK):
        out.append(Problem(what, f"{path} is not writable by {_user_name()}"))
    return out


def _socket_problems(what: str, path: Path) -> list[Problem]:
    if len(str(path).encode()) > SOCKET_PATH_MAX:
        return [Problem(what, f"{path} is longer than {SOCKET_PATH_MAX} bytes (Unix socket limit)")]
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(os.lstat(path).st_mode)):
        return [Problem(what, f"{path} exists and is not a socket; badged will not replace it")]
    return _dir_problems(what, path.parent, private=False,
                         created_by="create it 0755 owned by the daemon's user, or with systemd "
                                    "RuntimeDirectory=badged (packaging/systemd/badged.service)")


def _group_problems(group: str | None) -> list[Problem]:
    """The operator group exists and the daemon's user is in it.

    Giving the admin socket to a group is a chown(2), which an unprivileged
    process may only do to a group it belongs to.
    """
    if group is None:
        return []
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return [Problem("[daemon] operator_group", f"group {group!r} does not exist "
                                                   f"(create it: groupadd {group})")]
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        return [Problem("[daemon] operator_group",
                        f"the daemon's user {_user_name()} is not a member of group {group!r}, so it "
                        f"cannot give the admin socket to it (usermod -aG {group} {_user_name()}, "
                        f"or SupplementaryGroups={group} in the unit)")]
    return []


def _file_problems(what: str, path: Path) -> list[Problem]:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return [Problem(what, f"cannot read {path}: {exc.strerror}")]
    return []


def _writable_by_others(what: str, path: Path) -> list[Problem]:
    """A config or policy file others can write decides what the daemon grants.

    World-writable is refused; group-writable is a warning (a group of
    operators editing the policy is a legitimate choice, but say so).
    """
    try:
        st = os.stat(path)
    except OSError:
        return []  # reported where the file is read
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002:
        return [Problem(what, f"{path} has mode {mode:04o}: any local user can rewrite it; "
                              f"chmod o-w (0640 root:badged is the documented mode)")]
    if mode & 0o020:
        return [Problem(what, f"{path} has mode {mode:04o}: members of its group can rewrite it",
                        fatal=False)]
    return []


def _secret_problems(what: str, path: str) -> list[Problem]:
    try:
        read_secret_file(path)
    except ConfigError as exc:
        return [Problem(what, exc.detail)]
    return []


def pkcs11_module(config: Pkcs11Config) -> str | None:
    """The module path the daemon will load: ``module_path``, else the URI's."""
    try:
        uri = parse_pkcs11_uri(config.uri)
    except ConfigError:
        return config.module_path
    return config.module_path or uri.module_path


def _module_problems(module: str | None) -> list[Problem]:
    """Loadable = dlopen succeeds and it exports C_GetFunctionList.

    dlopen runs no PKCS#11 code (C_Initialize is not called), so this is safe
    offline and touches no token.
    """
    what = "[keystore] module_path"
    if not module:
        return [Problem(what, "no PKCS#11 module: set module_path (e.g. "
                              "/usr/lib/softhsm/libsofthsm2.so) or module-path= in the URI")]
    if not os.path.isfile(module):
        return [Problem(what, f"PKCS#11 module not found: {module}")]
    try:
        lib = ctypes.CDLL(module)
    except OSError as exc:
        return [Problem(what, f"PKCS#11 module {module} cannot be loaded: {exc}")]
    if not hasattr(lib, "C_GetFunctionList"):
        return [Problem(what, f"{module} is not a PKCS#11 module (no C_GetFunctionList)")]
    return []


def _softhsm_problems(config: DaemonConfig, module: str | None) -> list[Problem]:
    """SoftHSM finds its tokens through SOFTHSM2_CONF; say so before it fails vaguely."""
    if not module or "softhsm" not in os.path.basename(module):
        return []
    env = dict(config.module_env)
    conf = env.get("SOFTHSM2_CONF") or os.environ.get("SOFTHSM2_CONF")
    what = "[keystore] module_env"
    hint = ""
    if conf is None:
        # SoftHSM's compiled-in default: shared, and usually not the daemon's.
        conf = "/etc/softhsm/softhsm2.conf"
        hint = ("; give badged its own: module_env = { SOFTHSM2_CONF = "
                "\"/etc/badged/softhsm2.conf\" } (docs/deploy.md)")
        if not os.access(conf, os.R_OK):
            return [Problem(what, f"SoftHSM would read {conf}, which {_user_name()} cannot "
                                  f"read{hint}")]
    out = _file_problems(what, Path(conf))
    if out:
        return out
    try:
        text = Path(conf).read_text()
    except (OSError, UnicodeDecodeError):
        return out
    for raw in text.splitlines():
        key, sep, value = raw.partition("=")
        if sep and key.strip() == "directories.tokendir":
            tokendir = Path(value.strip())
            if not tokendir.is_dir():
                out.append(Problem(what, f"SoftHSM token directory {tokendir} (from {conf}) "
                                         f"does not exist{hint}"))
            elif not os.access(tokendir, os.R_OK | os.W_OK | os.X_OK):
                out.append(Problem(what, f"SoftHSM token directory {tokendir} (from {conf}) "
                                         f"is not readable and writable by {_user_name()}{hint}"))
    return out


def _keystore_problems(config: DaemonConfig) -> list[Problem]:
    ks = config.keystore
    if isinstance(ks, Pkcs11Config):
        out: list[Problem] = []
        module = pkcs11_module(ks)
        out += _module_problems(module)
        out += _softhsm_problems(config, module)
        uri = parse_pkcs11_uri(ks.uri)
        if uri.pin_source is None:
            out.append(Problem("[keystore] uri", "the URI needs pin-source=file:/path "
                                                 "(mode 0600, owned by the daemon's user)"))
        else:
            out += _secret_problems("[keystore] uri pin-source", uri.pin_source)
        return out
    assert isinstance(ks, TpmConfig)
    out = []
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        out.append(Problem("[keystore] backend", "the tpm backend needs tpm2-pytss: "
                                                 "pip install 'badged[tpm]' (docs/tpm.md)"))
    if ks.tcti.startswith("device:"):
        dev = ks.tcti.split(":", 1)[1] or "/dev/tpmrm0"
        if not os.path.exists(dev):
            out.append(Problem("[keystore] tcti", f"TPM device {dev} does not exist"))
        elif not os.access(dev, os.R_OK | os.W_OK):
            out.append(Problem("[keystore] tcti", f"{_user_name()} cannot open {dev} (add it to the "
                                                  f"device's group, usually tss)"))
    out += _dir_problems("[keystore] key_dir", Path(ks.key_dir), private=True,
                         created_by="create it 0700 owned by the daemon's user")
    if ks.key_auth_file:
        out += _secret_problems("[keystore] key_auth_file", ks.key_auth_file)
    return out


def _policy_problems(config: DaemonConfig) -> list[Problem]:
    """Every policy error at its line, and warnings for users, groups and paths
    this host does not have (badged.policy.check)."""
    from badged.policy.check import check_policy

    what = "[daemon] policy_file"
    path = config.policy_file
    if path is None:
        return [Problem(what, "not set: the policy grants nothing (deny by default)", fatal=False)]
    report = check_policy(path)
    _checked.clear()
    if report.policy is not None:
        _checked[path] = (report.text, report.policy)

    def where(line: int | None) -> str:
        return f"{path}:{line}" if line else str(path)

    out = [Problem(what, f"{where(e.line)}: {e.message}") for e in report.errors]
    out += _writable_by_others(what, path)
    out += [Problem(what, f"{where(w.line)}: {w.message}", fatal=False) for w in report.warnings]
    if report.ok and not report.agents:
        out.append(Problem(what, f"{path} grants nothing (deny by default)", fatal=False))
    return out


_checked: dict[Path, tuple[str, Policy]] = {}


def checked_policy(path: Path) -> Policy | None:
    """The policy the start-up check just parsed, if ``path`` still holds that text.

    Start-up parsed the policy file twice, the check and then the daemon's
    load (~1 s each for 10,000 rules; issue 22). The daemon takes the
    check's result instead, once, only while the file's text is the very
    text checked (read again and compared: a file edited in between is
    loaded afresh); anything else returns None and the caller loads it.
    """
    entry = _checked.pop(path, None)
    if entry is None:
        return None
    try:
        same = path.read_text() == entry[0]
    except (OSError, UnicodeDecodeError):
        return None
    return entry[1] if same else None


def offline(config: DaemonConfig, *,
            before_policy: Callable[[], None] | None = None) -> list[Problem]:
    """Every check that needs no token login; fatal problems first.

    ``before_policy``: called once every check but the policy's has passed
    with no fatal problem (the key store's module, PIN file and paths are
    sound). Start-up starts loading the PKCS#11 module there, so its
    ``C_Initialize`` (reading every object of a file-backed token) overlaps
    the policy check (~1-2 s for 10,000 rules; issue 22) instead of
    following it. The module was already dlopen'ed by the module check.
    """
    out: list[Problem] = []
    if config.source.startswith("/") or Path(config.source).exists():
        out += _writable_by_others("config", Path(config.source))
    out += _dir_problems("[daemon] state_dir", config.state_dir, private=False,
                         created_by="create it owned by the daemon's user, or with systemd "
                                    "StateDirectory=badged")
    if config.private_dir.exists():
        out += _dir_problems("[daemon] state_dir", config.private_dir, private=True,
                             created_by="")
    if config.audit_dir is not None:
        out += _dir_problems("[audit] dir", config.audit_dir, private=False,
                             created_by="create it owned by the daemon's user")
    out += _socket_problems("[daemon] workload_socket", config.workload_socket)
    out += _socket_problems("[daemon] admin_socket", config.admin_socket)
    if config.metrics_listen is not None and config.metrics_listen.startswith("/"):
        out += _socket_problems("[metrics] listen", Path(config.metrics_listen))
    out += _group_problems(config.operator_group)
    out += _keystore_problems(config)
    if before_policy is not None and not any(p.fatal for p in out):
        before_policy()
    out += _policy_problems(config)
    return _dedupe(sorted(out, key=lambda p: not p.fatal))


def _dedupe(problems: Iterable[Problem]) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for p in problems:
        if p.line() not in seen:
            seen.add(p.line())
            out.append(p)
    return out


def auth_failure(config: DaemonConfig, exc: KeyStoreAuthError) -> Problem:
    """A failed login, named: which token, which PIN file, and the lockout risk."""
    ks = config.keystore
    if isinstance(ks, Pkcs11Config):
        try:
            uri = parse_pkcs11_uri(ks.uri)
            token, pin = uri.redacted(), uri.pin_source
        except ConfigError:
            token, pin = ks.uri, None
        return Problem("[keystore] uri", f"token login failed: {token} refused the PIN in {pin} "
                                         f"[{exc.raw}]; {LOCKOUT_WARNING}")
    assert isinstance(ks, TpmConfig)
    return Problem("[keystore] key_auth_file",
                   f"TPM authorization failed with {ks.key_auth_file or 'an empty auth value'} "
                   f"[{exc.raw}]; repeated failures put the TPM into dictionary-attack lockout")


def online(config: DaemonConfig) -> list[Problem]:
    """Log into the token and list its keys: the one check that touches it.

    A wrong PIN counts against the token's retry limit, so this runs only
    when asked (``badged check --online``) and at most once.
    """
    from badged.keystore import open_keystore

    config.apply_module_env()
    store = None
    try:
        store = open_keystore(config.backend, config.keystore)  # may log in already
        store.list()
    except KeyStoreAuthError as exc:
        return [auth_failure(config, exc)]
    except BadgedError as exc:
        return [Problem("[keystore]", f"{describe_keystore(config)}: {exc}")]
    except OSError as exc:
        return [Problem("[keystore]", f"{describe_keystore(config)}: "
                                      f"{exc.strerror or errno.errorcode.get(exc.errno or 0)}")]
    finally:
        if store is not None:
            store.close()
    return []


def describe_keystore(config: DaemonConfig) -> str:
    ks = config.keystore
    if isinstance(ks, Pkcs11Config):
        try:
            return parse_pkcs11_uri(ks.uri).redacted()
        except ConfigError:
            return ks.uri
    assert isinstance(ks, TpmConfig)
    return f"TPM {ks.tcti}"


def checked_as() -> str:
    """Who the checks ran as: access depends on it (run check as the daemon's user)."""
    return f"{_user_name()} (uid {os.geteuid()})"
