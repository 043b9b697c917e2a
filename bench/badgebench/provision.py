"""One throwaway SoftHSM token in a private temp state dir, and the key in it.

The layout is the one ``badged dev --state-dir DIR`` uses
(``DIR/private/softhsm/{softhsm2.conf,user.pin,tokens/}``, label
``badged-dev``), so badged reuses this very token and every path in the
benchmark signs inside the same token. Nothing here touches /etc/softhsm.
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_LABEL = "badged-dev"
FALLBACK_KEY = "bench/p256"
MODULE_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
P11KIT_CLIENT_GLOBS = (
    "/usr/lib/*-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/pkcs11/p11-kit-client.so",
    "/usr/lib64/pkcs11/p11-kit-client.so",
)


def find_first(patterns: tuple[str, ...]) -> str | None:
    for pat in patterns:
        for hit in sorted(glob.glob(pat)):
            if os.path.isfile(hit):
                return os.path.realpath(hit)
    return None


@dataclass(frozen=True)
class Token:
    state_dir: Path
    conf: Path
    pin_file: Path
    module: str
    label: str = TOKEN_LABEL

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}


def _write_private(path: Path, data: str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)


def make_state_dir() -> Path:
    # Short /tmp path: Unix socket paths inside it must stay under 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="bb-", dir="/tmp"))
    os.chmod(state, 0o755)  # badged dev requires a non-private, non-writable state dir
    return state


def provision_token(state: Path, module: str) -> Token:
    private = state / "private"
    hsm = private / "softhsm"
    tokens = hsm / "tokens"
    for d in (private, hsm, tokens):
        d.mkdir(mode=0o700)
    conf = hsm / "softhsm2.conf"
    _write_private(conf, f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                         "log.level = ERROR\nslots.removable = false\n")
    pin, so_pin = secrets.token_hex(16), secrets.token_hex(16)
    pin_file = hsm / "user.pin"
    _write_private(pin_file, pin + "\n")
    # softhsm2-util takes PINs only on argv; the token is throwaway and lives
    # for this run only.
    proc = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
         "--pin", pin, "--so-pin", so_pin],
        env=dict(os.environ, SOFTHSM2_CONF=str(conf)), capture_output=True, text=True,
        check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"softhsm2-util --init-token failed: {proc.stderr.strip()[:200]}")
    return Token(state_dir=state, conf=conf, pin_file=pin_file, module=module)


def _key_info(module: str, label: str, pin_file: str, key: str, create: bool,
              conn: mp.connection.Connection) -> None:
    """In a spawned child: find (or create) ``key``; send its SPKI DER as hex."""
    try:
        import pkcs11
        from cryptography.hazmat.primitives import serialization
        from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

        lib = pkcs11.lib(module)
        token = lib.get_token(token_label=label)
        with open(pin_file) as fh:
            session = token.open(rw=True, user_pin=fh.read().strip())
        pubs: list[Any] = list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PUBLIC_KEY,
                                         pkcs11.Attribute.LABEL: key}))
        if not pubs and create:
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC,
                {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("1.2.840.10045.3.1.7")},
                local=True)
            pub, _ = params.generate_keypair(
                store=True, label=key, id=secrets.token_bytes(16),
                public_template={pkcs11.Attribute.TOKEN: True, pkcs11.Attribute.PRIVATE: False},
                private_template={pkcs11.Attribute.TOKEN: True, pkcs11.Attribute.PRIVATE: True,
                                  pkcs11.Attribute.SENSITIVE: True,
                                  pkcs11.Attribute.EXTRACTABLE: False,
                                  pkcs11.Attribute.SIGN: True})
            pubs = [pub]
        if not pubs:
            conn.send(("missing", key))
            return
        der = serialization.load_der_public_key(encode_ec_public_key(pubs[0])).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        session.close()
        conn.send(("ok", der.hex()))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def key_public_der(token: Token, key: str, *, create: bool) -> str | None:
    """SPKI DER (hex) of ``key``; None if absent and not created.

    Runs in a spawned process so this parent never loads the PKCS#11 module.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    os.environ.update(token.env)
    p = ctx.Process(target=_key_info,
                    args=(token.module, token.label, str(token.pin_file), key, create, child))
    p.start()
    child.close()
    try:
        if not parent.poll(60):
            raise RuntimeError("timed out reading the key from the token")
        status, value = parent.recv()
    except EOFError:
        raise RuntimeError("the key-reading process died (see its stderr)") from None
    finally:
        p.join(10)
    if status == "ok":
        return str(value)
    if status == "missing":
        return None
    raise RuntimeError(str(value))


def cleanup(state: Path) -> None:
    shutil.rmtree(state, ignore_errors=True)
