"""``[keystore] signing_mode`` and ``session_key_period``: defaults per backend,
and bad values refused with file and line like every other config key."""

from __future__ import annotations

from pathlib import Path

import pytest

from badged.config import load_config
from badged.errors import ConfigError

PKCS11 = 'backend = "pkcs11"\nuri = "pkcs11:token=t?pin-source=file:/etc/pin"\n'
TPM = 'backend = "tpm"\ntcti = "device:/dev/tpmrm0"\n'


def _load(tmp_path: Path, keystore: str) -> object:
    path = tmp_path / "badged.toml"
    path.write_text(f"[daemon]\nstate_dir = \"/var/lib/b\"\n\n[keystore]\n{keystore}")
    return load_config(path)


@pytest.mark.parametrize(("keystore", "mode", "period"), [
    (PKCS11, "direct", 300),
    (TPM, "session", 300),
    (PKCS11 + 'signing_mode = "session"\nsession_key_period = "2m"\n', "session", 120),
    (TPM + 'signing_mode = "direct"\n', "direct", 300),
    (TPM + "session_key_period = 1\n", "session", 1),
])
def test_signing_mode_defaults_and_overrides(tmp_path: Path, keystore: str, mode: str,
                                             period: int) -> None:
    cfg = _load(tmp_path, keystore)
    assert cfg.effective_signing_mode == mode  # type: ignore[attr-defined]
    assert cfg.session_key_period == period  # type: ignore[attr-defined]


@pytest.mark.parametrize(("extra", "line", "needle"), [
    ('signing_mode = "fast"\n', 9, "signing_mode must be"),
    ('session_key_period = "2h"\n', 9, "session_key_period must be"),
    ('session_key_period = "soon"\n', 9, "not a duration"),
    ("session_key_period = 0\n", 9, "positive"),
])
def test_bad_values_name_file_and_line(tmp_path: Path, extra: str, line: int, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, TPM + "\n\n" + extra)
    assert needle in str(err.value)
    assert err.value.line == line


@pytest.mark.parametrize(("keystore", "copies"), [
    (PKCS11, True),
    (PKCS11 + "session_key_copies = false\n", False),
    (PKCS11 + "session_key_copies = true\n", True),
])
def test_session_key_copies_setting(tmp_path: Path, keystore: str, copies: bool) -> None:
    cfg = _load(tmp_path, keystore)
    assert cfg.keystore.session_key_copies is copies  # type: ignore[attr-defined]


@pytest.mark.parametrize(("keystore", "needle"), [
    (PKCS11 + 'session_key_copies = "no"\n', "must be true or false"),
    (TPM + "session_key_copies = false\n", "pkcs11 setting"),
])
def test_session_key_copies_refusals(tmp_path: Path, keystore: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, keystore)
    assert needle in str(err.value)
