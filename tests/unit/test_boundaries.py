"""Error mapping, config/URI validation, secrets, and generated code freshness."""

from __future__ import annotations

import filecmp
import os
import sys
from pathlib import Path

import grpc
import pytest

from badged.config import load_config
from badged.errors import BadgedError, ConfigError, ErrorCode, all_error_classes
from badged.keystore.pkcs11.store import Pkcs11Config
from badged.keystore.uri import parse_pkcs11_uri
from badged.secrets import Secret, read_secret_file
from badged.service.errors import STATUS_FOR

ROOT = Path(__file__).resolve().parents[2]


def test_every_error_code_is_mapped() -> None:
    for code in ErrorCode:
        assert code in STATUS_FOR, code
    for cls in all_error_classes():
        assert STATUS_FOR[cls.code] != grpc.StatusCode.UNKNOWN, cls


def test_public_message_never_carries_detail() -> None:
    for cls in all_error_classes():
        try:
            exc: BadgedError = cls("secret-detail-1234")
        except TypeError:
            continue
        assert "secret-detail-1234" not in exc.caller_message, cls


def test_client_maps_every_status_the_daemon_sends() -> None:
    from badgeclient.errors import _BY_STATUS

    for status in set(STATUS_FOR.values()) - {grpc.StatusCode.INTERNAL}:
        assert status in _BY_STATUS, status


@pytest.mark.parametrize(("uri", "message"), [
    ("pkcs11:token=a?pin-value=1234", "pin-value"),
    ("pkcs11:object=x", "must name the token"),
    ("pkcs11:token=a;bogus=1", "unknown pkcs11 URI path attribute"),
    ("pkcs11:token=a?pin-source=relative/path", "absolute"),
    ("pkcs12:token=a", "not a pkcs11"),
])
def test_bad_pkcs11_uris(uri: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pkcs11_uri(uri)
    assert message in str(info.value)
    assert "1234" not in str(info.value)


def test_good_pkcs11_uri() -> None:
    u = parse_pkcs11_uri("pkcs11:token=My%20Token;serial=42?module-path=/m.so&pin-source=file:///p/pin")
    assert u.token_label == "My Token" and u.serial == "42"
    assert u.module_path == "/m.so" and u.pin_source == "/p/pin"


def test_secret_never_prints() -> None:
    s = Secret("123456")
    assert "123456" not in repr(s) and "123456" not in str(s) and "123456" not in f"{s}"


def test_pin_file_must_be_private(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    os.chmod(pin, 0o644)
    with pytest.raises(ConfigError) as info:
        read_secret_file(str(pin))
    assert "0644" in str(info.value) and "1234" not in str(info.value)
    os.chmod(pin, 0o600)
    assert read_secret_file(str(pin)).reveal() == "1234"


CONFIG_ERRORS = [
    ("[daemon]\nstate_dir = \"relative\"\n[keystore]\nuri = \"pkcs11:token=a\"\n", 2, "absolute"),
    ("[daemon]\nbogus = 1\n[keystore]\nuri = \"pkcs11:token=a\"\n", 2, "unknown key"),
    ("[keystore]\nuri = \"pkcs11:token=a?pin-value=9\"\n", 2, "pin-value"),
    ("[keystore]\nbackend = \"yubikey\"\nuri = \"pkcs11:token=a\"\n", 2, "unknown keystore backend"),
    ("[daemon]\nmax_ttl = \"99h\"\n[keystore]\nuri = \"pkcs11:token=a\"\n", 2, "hard cap"),
    ("[daemon]\ndefault_ttl = 600\nmax_ttl = 60\n[keystore]\nuri = \"pkcs11:token=a\"\n", 2,
     "exceed"),
    ("[nope]\n", 1, "unknown section"),
    ("[keystore]\nbackend = \"tpm\"\n", 1, "tcti is required"),
    ("[keystore]\nbackend = \"tpm\"\ntcti = \"device:/dev/tpmrm0\"\nuri = \"pkcs11:token=a\"\n", 4,
     "pkcs11 setting"),
    ("[keystore]\nuri = \"pkcs11:token=a\"\ntcti = \"device:/dev/tpmrm0\"\n", 3, "tpm setting"),
    ("[daemon\n", 1, "TOML syntax"),
]


@pytest.mark.parametrize(("text", "line", "message"), CONFIG_ERRORS)
def test_bad_config_names_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "badged.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert info.value.line == line, str(info.value)
    assert message in str(info.value)


def test_shipped_example_config_loads() -> None:
    cfg = load_config(ROOT / "docs" / "badged.example.toml")
    assert isinstance(cfg.keystore, Pkcs11Config) and cfg.keystore.uri.startswith("pkcs11:")


def test_generated_protobuf_code_is_current(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import generate  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    generate.generate(tmp_path)
    committed = ROOT / "clients" / "badged_proto"
    fresh = tmp_path / "badged_proto"
    stale: list[str] = []
    for path in fresh.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(fresh)
            other = committed / rel
            if not other.exists() or not filecmp.cmp(path, other, shallow=False):
                stale.append(str(rel))
    assert not stale, f"regenerate with: python protos/generate.py (stale: {stale})"


def test_shipped_example_policy_loads() -> None:
    from badged.policy.loader import load_policy

    policy = load_policy(ROOT / "docs" / "policy.example.toml")
    assert [r.agent for r in policy.agents] == ["deploy-bot", "ci-runner"]
    assert set(policy.bundles) == {"deploy", "prod-write", "artifacts"}
    assert policy.bundles["prod-write"].approval and policy.baseline is not None


def test_tpm_backend_config(tmp_path: Path) -> None:
    from badged.keystore.tpm.store import TpmConfig

    path = tmp_path / "badged.toml"
    path.write_text('[daemon]\nstate_dir = "/var/lib/b"\n[keystore]\nbackend = "tpm"\n'
                    'tcti = "device:/dev/tpmrm0"\nparent_handle = "0x81000001"\n')
    cfg = load_config(path)
    assert cfg.backend == "tpm" and isinstance(cfg.keystore, TpmConfig)
    assert cfg.keystore.parent_handle == 0x81000001
    assert cfg.keystore.key_dir == "/var/lib/b/private/tpm-keys"
