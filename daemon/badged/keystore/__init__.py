"""Key stores, registered explicitly by backend name (no import-order magic).

Backends import their vendor libraries lazily, so the client library and a
PKCS#11-only install never need tpm2-pytss (and vice versa). The in-memory
store is deliberately absent: a config typo must never yield software keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from badged.keystore.port import KeyStore


def _pkcs11(config: Any) -> KeyStore:
    from badged.keystore.pkcs11.store import Pkcs11KeyStore

    return Pkcs11KeyStore.from_config(config)


def _tpm(config: Any) -> KeyStore:
    from badged.keystore.tpm.store import TpmKeyStore

    return TpmKeyStore.from_config(config)


BACKENDS: dict[str, Callable[[Any], KeyStore]] = {
    "pkcs11": _pkcs11,
    "tpm": _tpm,
}


def open_keystore(backend: str, config: Any) -> KeyStore:
    try:
        factory = BACKENDS[backend]
    except KeyError:
        from badged.errors import ConfigError

        raise ConfigError(f"unknown keystore backend {backend!r} "
                          f"(known: {', '.join(sorted(BACKENDS))})") from None
    return factory(config)
