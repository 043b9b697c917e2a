"""Provision throwaway SoftHSM2 tokens for dev mode and the test suite.

The token lives in a private directory with its own ``softhsm2.conf``; the
caller must export ``SOFTHSM2_CONF`` (returned here) *before* the module is
first loaded in the process, because SoftHSM reads it only at C_Initialize.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from badged.errors import ConfigError

_TEMPLATE = Path(__file__).resolve().parents[2] / "softhsm" / "softhsm2.conf.in"
_FALLBACK_TEMPLATE = """directories.tokendir = @TOKENDIR@
objectstore.backend = file
log.level = ERROR
slots.removable = false
"""
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


@dataclass(frozen=True)
class SoftHsmToken:
    """Where a provisioned token is, and how to reach it (PIN by file only)."""

    conf_path: Path
    module_path: str
    label: str
    pin_file: Path

    def uri(self) -> str:
        return f"pkcs11:token={self.label}?pin-source=file:{self.pin_file}"


def find_module() -> str:
    """Locate libsofthsm2.so or explain how to install it."""
    override = os.environ.get("BADGED_SOFTHSM_MODULE")
    for candidate in ([override] if override else []) + list(MODULE_CANDIDATES):
        if candidate and os.path.isfile(candidate):
            return candidate
    raise ConfigError(
        "SoftHSM2 module not found; install it with: sudo apt-get install -y softhsm2"
    )


def _write_private(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)


def provision(directory: Path, label: str = "badged-dev") -> SoftHsmToken:
    """Create (or reuse) a token under ``directory``; idempotent per directory."""
    if shutil.which("softhsm2-util") is None:
        raise ConfigError("softhsm2-util not found; install it with: sudo apt-get install -y softhsm2")
    module = find_module()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    tokendir = directory / "tokens"
    conf = directory / "softhsm2.conf"
    pin_file = directory / "user.pin"
    if conf.exists() and pin_file.exists() and any(tokendir.iterdir()):
        return SoftHsmToken(conf, module, label, pin_file)
    tokendir.mkdir(mode=0o700, exist_ok=True)
    template = _TEMPLATE.read_text() if _TEMPLATE.exists() else _FALLBACK_TEMPLATE
    conf.write_text(template.replace("@TOKENDIR@", str(tokendir)))
    os.chmod(conf, 0o600)
    pin = secrets.token_hex(16)
    so_pin = secrets.token_hex(16)
    if pin_file.exists():
        pin_file.unlink()
    _write_private(pin_file, pin + "\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    # The PINs go to softhsm2-util on argv: it has no other interface. The
    # token is throwaway, and argv is visible only to this user's processes
    # for the few milliseconds the tool runs (hidepid permitting).
    proc = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label,
         "--pin", pin, "--so-pin", so_pin],
        env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise ConfigError(f"softhsm2-util --init-token failed: {proc.stderr.strip()[:200]}")
    return SoftHsmToken(conf, module, label, pin_file)
