"""Child process for test_pkcs11_early_login.py (one login per process, SOFTHSM2_CONF per process).

argv: MODE TOKEN_DIR. Prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from badged import secrets as secrets_mod
from badged.errors import KeyStoreAuthError
from badged.keystore.pkcs11 import store as p11
from badged.keystore.port import DEVICE_KEY
from badged.softhsm import provision


def main(mode: str, directory: Path) -> None:
    token = provision(directory, label="badged-early")
    os.environ["SOFTHSM2_CONF"] = str(token.conf_path)
    out: dict[str, Any] = {}
    reveals: list[int] = []
    real_reveal = secrets_mod.Secret.reveal

    def counting(self: secrets_mod.Secret) -> str:
        reveals.append(1)
        return real_reveal(self)

    secrets_mod.Secret.reveal = counting  # type: ignore[method-assign]
    walks: list[str] = []
    real_list, real_pair = p11._list_labels, p11._pair_by_label

    def list_counted(*args: Any) -> Any:
        walks.append(f"list:{threading.current_thread().name}")
        return real_list(*args)

    def pair_counted(*args: Any) -> Any:
        walks.append(f"pair:{threading.current_thread().name}")
        return real_pair(*args)

    p11._list_labels, p11._pair_by_label = list_counted, pair_counted  # type: ignore[assignment]
    config = p11.Pkcs11Config(uri=token.uri(), module_path=token.module_path)
    if mode == "setup":
        store = p11.Pkcs11KeyStore.from_config(config)
        for name in (DEVICE_KEY, "badged/agent/a/v1/tok", "badged/agent/a/v1/sig"):
            store.generate(name)
        out["labels"] = list(store.list())
        store.close()
    elif mode in ("early", "early-then-change"):
        go = threading.Event()
        p11.prefetch(config, login_after=go, preload=(DEVICE_KEY,))
        go.set()
        store = p11.Pkcs11KeyStore.from_config(config)
        out["pin_reveals"] = len(reveals)
        device = store.get(DEVICE_KEY)
        out["device_kid_ok"] = device.public_key() == store._call(  # the general lookup agrees
            lambda s: store._load(s, DEVICE_KEY)).public_key()
        walks_before = list(walks)
        if mode == "early-then-change":
            store.generate("badged/agent/b/v1/tok")
        out["labels"] = list(store.list())
        out["labels_again"] = list(store.list())  # the early snapshot is used once at most
        out["walks_before"], out["walks"] = walks_before, walks
        store.close()
    elif mode == "wrong-pin":
        token.pin_file.write_text("0000wrong\n")
        go = threading.Event()
        p11.prefetch(config, login_after=go, preload=(DEVICE_KEY,))
        go.set()
        try:
            p11.Pkcs11KeyStore.from_config(config)
            out["error"] = None
        except KeyStoreAuthError as exc:
            out["error"] = type(exc).__name__
        out["pin_reveals"] = len(reveals)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
