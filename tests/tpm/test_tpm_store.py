"""TpmKeyStore against a real swtpm: faults, persistence, slots, lockout.

Each test owns a private swtpm (copied from the session's provisioned state),
so killing it, clearing it or locking it out affects nobody else.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from badged.errors import (
    ConfigError,
    KeyNotFoundError,
    KeyStoreAuthError,
    KeyStoreError,
    KeyStoreUnavailableError,
)
from badged.keystore.port import KeyStore
from badged.keystore.tpm.store import TpmConfig, TpmKeyStore, key_file_name
from tests.tpm_fixtures import SwtpmInstance

pytestmark = pytest.mark.tpm

ES256 = ec.ECDSA(hashes.SHA256())


def _store(inst: SwtpmInstance, **kw: Any) -> TpmKeyStore:
    return TpmKeyStore.from_config(TpmConfig(tcti=inst.tcti, key_dir=str(inst.key_dir), **kw))


def _transient_handles(inst: SwtpmInstance) -> list[int]:
    """Objects loaded in the TPM, read over a second connection."""
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HC

    ectx = inst.esapi()
    try:
        _more, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 16)
        return [int(h) for h in data.data.handles.handle[0:data.data.handles.count]]
    finally:
        ectx.close()


def _lockout_counter(inst: SwtpmInstance) -> int:
    from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

    ectx = inst.esapi()
    try:
        _more, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        return int(data.data.tpmProperties.tpmProperty[0].value)
    finally:
        ectx.close()


def _auth_file(inst: SwtpmInstance, name: str, value: str) -> str:
    path = inst.base / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, value.encode() + b"\n")
    os.close(fd)
    return str(path)


def test_is_a_keystore(tpm_store: TpmKeyStore) -> None:
    assert isinstance(tpm_store, KeyStore)


def test_properties_read_back_from_tpm(tpm_store: TpmKeyStore) -> None:
    tpm_store.generate("agent/p")
    props = tpm_store.properties("agent/p")
    assert (props.backend, props.sensitive, props.extractable, props.never_extractable, props.local) == (
        "tpm", True, False, True, True)
    attrs = int(props.extra["object_attributes"], 16)
    # fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, sign; never decrypt/restricted
    assert attrs & 0x00040072 == 0x00040072
    assert attrs & 0x00030000 == 0
    assert props.extra["tpm_name"].startswith("000b")


def test_key_file_is_private_and_atomic(tpm_store: TpmKeyStore, swtpm_instance: SwtpmInstance) -> None:
    tpm_store.generate("agent/deploy-bot/tok:1")
    files = os.listdir(swtpm_instance.key_dir)
    assert files == [key_file_name("agent/deploy-bot/tok:1")]  # no temp files left
    st = os.stat(swtpm_instance.key_dir / files[0])
    assert st.st_mode & 0o777 == 0o600
    assert tpm_store.list() == ["agent/deploy-bot/tok:1"]


def test_prehashed_and_other_hashes(tpm_store: TpmKeyStore) -> None:
    key = tpm_store.generate("agent/h")
    for algo in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        sig = key.sign(b"data", ec.ECDSA(algo))
        key.public_key().verify(sig, b"data", ec.ECDSA(algo))
    h = hashes.Hash(hashes.SHA256())
    h.update(b"data")
    sig = key.sign(h.finalize(), ec.ECDSA(Prehashed(hashes.SHA256())))
    key.public_key().verify(sig, b"data", ES256)
    with pytest.raises(KeyStoreError):
        key.sign(b"x", ec.ECDSA(hashes.SHA1()))


def test_keys_survive_daemon_and_tpm_restart(swtpm_instance: SwtpmInstance) -> None:
    store = _store(swtpm_instance)
    key = store.generate("agent/persist")
    public = key.public_key().public_numbers()
    store.close()
    swtpm_instance.restart()
    again = _store(swtpm_instance)
    try:
        reloaded = again.get("agent/persist")
        assert reloaded.public_key().public_numbers() == public
        sig = reloaded.sign(b"after restart", ES256)
        key.public_key().verify(sig, b"after restart", ES256)
    finally:
        again.close()


def test_killed_tpm_is_unavailable_then_recovers(swtpm_instance: SwtpmInstance) -> None:
    store = _store(swtpm_instance)
    try:
        key = store.generate("agent/k")
        key.sign(b"before", ES256)
        swtpm_instance.kill()
        for _ in range(3):  # every call while it is down fails closed, none hangs
            with pytest.raises(KeyStoreUnavailableError) as info:
                key.sign(b"during", ES256)
            assert info.value.raw is not None and info.value.raw.startswith("0x")
        with pytest.raises(KeyStoreUnavailableError):
            store.ping()
        swtpm_instance.start()
        sig = key.sign(b"after", ES256)  # same store object, no restart
        key.public_key().verify(sig, b"after", ES256)
        store.ping()
    finally:
        store.close()


def test_kill_under_load_only_unavailable_then_recovery(swtpm_instance: SwtpmInstance) -> None:
    """swtpm dies mid-request while 4 threads sign: only UNAVAILABLE, never a
    hang, a wrong signature or another error; then signing resumes."""
    store = _store(swtpm_instance)
    keys = [store.generate(f"agent/l{i}") for i in range(3)]
    stop = threading.Event()
    ok = [0]
    unexpected: list[BaseException] = []
    unavailable = [0]

    def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            key = keys[(i + n) % len(keys)]
            n += 1
            msg = f"{i}-{n}".encode()
            try:
                key.public_key().verify(key.sign(msg, ES256), msg, ES256)
                ok[0] += 1
            except KeyStoreUnavailableError:
                unavailable[0] += 1
                time.sleep(0.005)
            except BaseException as exc:
                unexpected.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        swtpm_instance.kill()
        deadline = time.monotonic() + 10
        while unavailable[0] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        before_restart = ok[0]
        swtpm_instance.start()
        deadline = time.monotonic() + 10  # generous: the suite may share a busy machine
        while ok[0] < before_restart + 50 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        store.close()
    assert not unexpected, unexpected[:3]
    assert all(not t.is_alive() for t in threads)
    assert unavailable[0] > 0
    assert ok[0] >= before_restart + 50, "signing did not resume after swtpm came back"


def test_wrong_tcti(swtpm_instance: SwtpmInstance) -> None:
    kd = str(swtpm_instance.key_dir)
    with pytest.raises(ConfigError, match=r"not supported|cannot be used"):
        TpmKeyStore.from_config(TpmConfig(tcti="nosuchtcti:", key_dir=kd))
    with pytest.raises(ConfigError):
        TpmKeyStore.from_config(TpmConfig(tcti="swtpm:bogus=1", key_dir=kd))
    with pytest.raises(ConfigError):
        TpmKeyStore.from_config(TpmConfig(tcti="", key_dir=kd))
    with pytest.raises(KeyStoreUnavailableError):  # absent TPM: may appear later
        TpmKeyStore.from_config(TpmConfig(tcti=f"swtpm:path={swtpm_instance.base}/none", key_dir=kd))
    with pytest.raises(KeyStoreUnavailableError):
        TpmKeyStore.from_config(TpmConfig(tcti="device:/dev/tpmrm97", key_dir=kd))


def test_unsafe_key_dir_refused(swtpm_instance: SwtpmInstance) -> None:
    os.chmod(swtpm_instance.key_dir, 0o755)
    with pytest.raises(ConfigError, match="0700"):
        _store(swtpm_instance)


def test_handles_are_flushed_with_many_keys(swtpm_instance: SwtpmInstance) -> None:
    """swtpm holds 3 objects: 7 keys used in turn must never need more than
    the primary plus the cache."""
    store = _store(swtpm_instance)
    try:
        keys = [store.generate(f"agent/f{i}") for i in range(7)]
        for rnd in range(3):
            for key in keys:
                msg = f"{rnd}{key.name}".encode()
                key.public_key().verify(key.sign(msg, ES256), msg, ES256)
            store.properties(keys[rnd].name)
            assert len(_transient_handles(swtpm_instance)) <= 2
    finally:
        store.close()
    assert _transient_handles(swtpm_instance) == []
    uncached = _store(swtpm_instance, cached_keys=0)
    try:
        for key in keys:
            uncached.get(key.name).sign(b"x", ES256)
        assert len(_transient_handles(swtpm_instance)) == 1  # only the primary
    finally:
        uncached.close()


def test_stale_handles_of_a_crashed_daemon_are_reclaimed(swtpm_instance: SwtpmInstance) -> None:
    """A daemon killed without flushing leaves objects in the slots; a new one
    must still start instead of failing with 'out of memory for object contexts'."""
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    from badged.keystore.tpm.store import srk_template

    leaker = swtpm_instance.esapi()
    for _ in range(3):
        leaker.create_primary(TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER)
    leaker.close()  # ESAPI.close() frees no slot
    assert len(_transient_handles(swtpm_instance)) == 3
    store = _store(swtpm_instance)
    try:
        store.generate("agent/after-crash").sign(b"x", ES256)
    finally:
        store.close()


def _corrupt(path: Path, mutate: Any) -> None:
    data = path.read_bytes()
    path.write_bytes(mutate(data))


@pytest.mark.parametrize(("mutation", "reason"), [
    (lambda d: b"", "no TSS2 PRIVATE KEY"),
    (lambda d: d.replace(b"name: agent/c", b"name: agent/z"), "file is for key"),
    (lambda d: d.replace(b"KEY-----\nMI", b"KEY-----\nAA"), "corrupted"),
    (lambda d: d[:-80] + b"\n-----END TSS2 PRIVATE KEY-----\n", "corrupted"),
    (lambda d: d.replace(b"badged-tpm-key: 1", b"badged-tpm-key: 9"), "unsupported format"),
])
def test_corrupted_key_file_is_refused_with_reason(tpm_store: TpmKeyStore, swtpm_instance: SwtpmInstance,
                                                   mutation: Any, reason: str) -> None:
    tpm_store.generate("agent/c")
    tpm_store.generate("agent/ok")
    tpm_store.close()  # drop cached blobs
    _corrupt(swtpm_instance.key_dir / key_file_name("agent/c"), mutation)
    store = _store(swtpm_instance)
    try:
        with pytest.raises(KeyStoreError, match=reason) as info:
            store.get("agent/c").sign(b"x", ES256)
        assert not isinstance(info.value, KeyStoreUnavailableError | KeyNotFoundError)
        store.get("agent/ok").sign(b"x", ES256)  # one bad file breaks nothing else
    finally:
        store.close()


def test_tampered_private_blob_is_rejected_by_the_tpm(tpm_store: TpmKeyStore,
                                                      swtpm_instance: SwtpmInstance) -> None:
    """A valid-looking file whose encrypted private part was altered: the TPM's
    integrity check refuses it, and we say so (not 'unavailable')."""
    from tpm2_pytss.tsskey import TSSPrivKey

    tpm_store.generate("agent/t")
    tpm_store.close()
    path = swtpm_instance.key_dir / key_file_name("agent/t")
    data = path.read_bytes()
    start = data.index(b"-----BEGIN")
    tss = TSSPrivKey.from_pem(data[start:])
    raw = bytearray(tss.private.marshal())
    raw[40] ^= 0x01
    from tpm2_pytss.types import TPM2B_PRIVATE

    bad, _ = TPM2B_PRIVATE.unmarshal(bytes(raw))
    forged = TSSPrivKey(bad, tss.public, empty_auth=True, parent=tss.parent)
    path.write_bytes(data[:start] + bytes(forged.to_pem()))
    store = _store(swtpm_instance)
    try:
        with pytest.raises(KeyStoreError, match="TPM rejected the blob") as info:
            store.get("agent/t").sign(b"x", ES256)
        assert info.value.raw is not None
        store.generate("agent/u").sign(b"x", ES256)  # store still healthy
    finally:
        store.close()


def test_key_from_a_cleared_tpm_is_refused_clearly(swtpm_instance: SwtpmInstance) -> None:
    """TPM2_Clear changes the owner seed: old files can never load again, and
    the error says why instead of showing an integrity rc."""
    from tpm2_pytss.constants import ESYS_TR

    store = _store(swtpm_instance)
    store.generate("agent/old")
    store.close()
    ectx = swtpm_instance.esapi()
    ectx.clear(ESYS_TR.RH_LOCKOUT)
    ectx.close()
    store = _store(swtpm_instance)
    try:
        with pytest.raises(KeyStoreError, match="another storage key"):
            store.get("agent/old").sign(b"x", ES256)
    finally:
        store.close()


def test_wrong_key_auth_is_reported_once_and_never_retried(swtpm_instance: SwtpmInstance) -> None:
    good = _auth_file(swtpm_instance, "good", "correct horse")
    bad = _auth_file(swtpm_instance, "bad", "wrong horse")
    store = _store(swtpm_instance, key_auth_file=good)
    key = store.generate("agent/da")
    key.public_key().verify(key.sign(b"x", ES256), b"x", ES256)
    assert store.properties("agent/da").extra["da_protected"] == "true"
    store.close()
    before = _lockout_counter(swtpm_instance)
    wrong = _store(swtpm_instance, key_auth_file=bad)
    try:
        for _ in range(10):
            with pytest.raises(KeyStoreAuthError):
                wrong.get("agent/da").sign(b"x", ES256)
        with pytest.raises(KeyStoreAuthError):
            wrong.ping()
    finally:
        wrong.close()
    assert _lockout_counter(swtpm_instance) == before + 1  # one TPM attempt, not ten
    again = _store(swtpm_instance, key_auth_file=good)  # the TPM is not locked out
    try:
        again.get("agent/da").sign(b"y", ES256)
    finally:
        again.close()


def test_key_needing_auth_without_auth_configured(swtpm_instance: SwtpmInstance) -> None:
    store = _store(swtpm_instance, key_auth_file=_auth_file(swtpm_instance, "a", "pw"))
    store.generate("agent/needs")
    store.close()
    plain = _store(swtpm_instance)
    try:
        before = _lockout_counter(swtpm_instance)
        with pytest.raises(KeyStoreAuthError, match="key_auth_file"):
            plain.get("agent/needs").sign(b"x", ES256)
        assert _lockout_counter(swtpm_instance) == before
    finally:
        plain.close()


def _force_lockout(inst: SwtpmInstance) -> None:
    """Three wrong auth values on a throwaway DA-protected key (swtpm: max 3)."""
    from tpm2_pytss import TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import (
        TPM2B_AUTH,
        TPM2B_DIGEST,
        TPM2B_SENSITIVE_CREATE,
        TPMS_SENSITIVE_CREATE,
        TPMT_SIG_SCHEME,
    )

    from badged.keystore.tpm.store import agent_key_template, srk_template

    ectx = inst.esapi()
    try:
        srk, _, _, _, _ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER)
        sens = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(b"right")))
        priv, pub, _, _, _ = ectx.create(srk, sens, agent_key_template(True))
        handle = ectx.load(srk, priv, pub)
        ectx.tr_set_auth(handle, b"wrong")
        for _ in range(5):
            try:
                ectx.sign(handle, TPM2B_DIGEST(b"\0" * 32), TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
            except TSS2_Exception:
                pass
        ectx.flush_context(handle)
        ectx.flush_context(srk)
    finally:
        ectx.close()


def test_lockout_is_detected_and_reported(swtpm_instance: SwtpmInstance) -> None:
    auth = _auth_file(swtpm_instance, "a", "pw")
    protected = _store(swtpm_instance, key_auth_file=auth)
    pkey = protected.generate("agent/protected")
    nkey_name = "agent/plain"
    protected.close()  # swtpm has 3 slots and no resource manager: one store at a time
    _force_lockout(swtpm_instance)
    protected = _store(swtpm_instance, key_auth_file=auth)
    pkey = protected.get("agent/protected")
    try:
        with pytest.raises(KeyStoreAuthError, match="lockout") as info:
            pkey.sign(b"x", ES256)
        assert info.value.raw == "0x921"
        with pytest.raises(KeyStoreAuthError, match="lockout"):
            protected.ping()
        # Lockout is not latched: it heals with time, so the store keeps asking.
        with pytest.raises(KeyStoreAuthError, match="lockout"):
            pkey.sign(b"x", ES256)
    finally:
        protected.close()
    # noDA keys (the default, empty auth) are not held hostage by it.
    plain = _store(swtpm_instance)
    try:
        nkey = plain.generate(nkey_name)
        nkey.public_key().verify(nkey.sign(b"x", ES256), b"x", ES256)
        plain.ping()
    finally:
        plain.close()


def test_destroyed_then_regenerated_name_does_not_revive_old_handle(tpm_store: TpmKeyStore) -> None:
    old = tpm_store.generate("agent/re")
    tpm_store.destroy("agent/re")
    tpm_store.generate("agent/re")
    with pytest.raises(KeyNotFoundError):
        old.sign(b"x", ES256)


def test_owner_password_needs_a_persistent_parent(swtpm_instance: SwtpmInstance) -> None:
    """With an owner password the SRK cannot be re-created by the daemon: a
    clear message, and the documented fix (persistent SRK + parent_handle) works."""
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    from badged.keystore.tpm.store import srk_template

    ectx = swtpm_instance.esapi()
    ectx.hierarchy_change_auth(ESYS_TR.OWNER, b"owner-pw")
    ectx.close()
    with pytest.raises(KeyStoreAuthError, match="parent_handle"):
        _store(swtpm_instance)
    ectx = swtpm_instance.esapi()
    ectx.tr_set_auth(ESYS_TR.OWNER, b"owner-pw")
    srk, _, _, _, _ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER)
    ectx.evict_control(ESYS_TR.OWNER, srk, 0x81000001)
    ectx.flush_context(srk)
    ectx.close()
    store = _store(swtpm_instance, parent_handle=0x81000001)
    try:
        key = store.generate("agent/under-persistent")
        key.public_key().verify(key.sign(b"x", ES256), b"x", ES256)
        assert store.properties("agent/under-persistent").extra["parent"] == "0x81000001"
    finally:
        store.close()
    assert _transient_handles(swtpm_instance) == []  # a persistent parent is never flushed
    with pytest.raises(ConfigError, match="persistent"):
        _store(swtpm_instance, parent_handle=0x80000001)
    regen = _store(swtpm_instance, parent_handle=0x81000001)
    try:  # files made under the persistent parent still load after a reconnect
        regen.get("agent/under-persistent").sign(b"y", ES256)
    finally:
        regen.close()


def test_endorsement_password_blocks_attestation_not_signing(swtpm_instance: SwtpmInstance) -> None:
    """An auth failure on a hierarchy is reported but not latched: it is not
    the agent key's auth and costs no DA try."""
    from tpm2_pytss.constants import ESYS_TR

    ectx = swtpm_instance.esapi()
    ectx.hierarchy_change_auth(ESYS_TR.ENDORSEMENT, b"endorsement-pw")
    ectx.close()
    store = _store(swtpm_instance)
    try:
        key = store.generate("agent/e")
        with pytest.raises(KeyStoreAuthError):
            store.attest("agent/e", os.urandom(16))
        key.public_key().verify(key.sign(b"x", ES256), b"x", ES256)
        store.ping()
    finally:
        store.close()


class _FakeTss(Exception):
    def __init__(self, rc: int) -> None:
        super().__init__(f"rc 0x{rc:x}")
        self.rc = rc


@pytest.mark.parametrize(("rc", "expected"), [
    (0xA000A, KeyStoreUnavailableError),  # TCTI IO error: TPM gone
    (0xA0008, KeyStoreUnavailableError),  # TCTI no connection
    (0x7000A, KeyStoreUnavailableError),  # ESAPI: bad sequence after a broken command
    (0x80005, KeyStoreUnavailableError),  # SYS layer
    (0x922, KeyStoreUnavailableError),  # TPM_RC_RETRY
    (0x90A, KeyStoreUnavailableError),  # TPM_RC_TESTING
    (0x100, KeyStoreUnavailableError),  # TPM_RC_INITIALIZE
    (0x902, KeyStoreUnavailableError),  # object memory
    (0x921, KeyStoreAuthError),  # lockout
    (0x98E, KeyStoreAuthError),  # AUTH_FAIL, session 1
    (0x9A2, KeyStoreAuthError),  # BAD_AUTH, session 1
    (0x1DF, KeyStoreError),  # INTEGRITY on parameter 1: not transient
    (0xA0015, KeyStoreError),  # TCTI not supported: config, not unavailable
])
def test_rc_translation_table(rc: int, expected: type[KeyStoreError]) -> None:
    """Pure check of the rc mapping (the fake is only an rc carrier)."""
    from badged.keystore.tpm.store import translate

    err = translate(_FakeTss(rc), "op")
    assert type(err) is expected
    assert err.raw == f"0x{rc:x}"
