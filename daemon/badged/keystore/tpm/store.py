"""TPM 2.0 key store over tpm2-pytss (ESAPI), tested against swtpm.

Facts that shape this module (measured, see FINDINGS §3):

* One ESAPI context shared by threads breaks ("wrong order", hangs): every
  call into it happens on one thread (a :class:`DeviceWorker`) under
  ``self._lock``. Callers wait for it at most ``command_timeout``, so a TPM
  that stops answering costs them UNAVAILABLE, never a hang; public keys
  come from the key files and never wait for the TPM (docs/tpm.md,
  "Deadlines").
* swtpm (and a TPM without a resource manager) has 3 slots for loaded
  objects, and ``ESAPI.close()`` frees none of them. So the store keeps exactly
  one storage primary loaded, at most ``cached_keys`` agent keys, and flushes
  every other transient handle as soon as the command that needed it is done.
* Keys are not kept in the TPM (NV is tiny): each agent key is a child of the
  storage primary, saved as its public/private blob in ``key_dir``. The
  private part is encrypted and integrity-protected by the TPM under the
  primary, so the file is useless on another TPM or after a TPM clear.
* The storage primary (standard TCG ECC P-256 SRK template, empty unique) is
  re-created at every connect: the owner seed derives the same key each time,
  so nothing has to be provisioned. An operator who set an owner password
  provisions a persistent SRK instead and gives its handle (``parent_handle``).
* Killing swtpm (like a power loss) is an unorderly shutdown, which the TPM
  counts as a dictionary-attack failure. Keys with an empty auth value are
  therefore created ``noDA``: otherwise three crashes, or any local user
  hammering some other key, would lock every agent key out. Keys are
  DA-protected only when an auth value is configured (``key_auth_file``);
  then a wrong value is reported once and *latched*, so retries never burn
  more DA tries.

Key files are RFC 7468 PEM ("TSS2 PRIVATE KEY", the tpm2-tss-engine /
tpm2-openssl format) preceded by a few ``key: value`` header lines that
record the badged key name and the parent's TPM Name, so a wrong or corrupted
file is refused with a reason instead of a bare TPM error code.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

# The TSS logs every error to stderr unless told otherwise; our errors are
# translated and logged here instead. Must be set before libtss2 is loaded.
os.environ.setdefault("TSS2_LOG", "all+none")

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    encode_dss_signature,
)

from badged.errors import (
    AttestationError,
    ConfigError,
    InvalidRequestError,
    KeyExistsError,
    KeyNotFoundError,
    KeyStoreAuthError,
    KeyStoreError,
    KeyStoreUnavailableError,
)
from badged.fsutil import atomic_write, ensure_private_dir
from badged.keystore.attest import FORMAT_TPM2_CERTIFY, KeyAttestation
from badged.keystore.port import (
    KeyAlgorithm,
    KeyHandle,
    KeyProperties,
    check_key_name,
    digest_for,
)
from badged.keystore.watchdog import DeviceWorker
from badged.secrets import read_secret_file

_logger = logging.getLogger(__name__)

T = TypeVar("T")

BACKEND = "tpm"
FILE_SUFFIX = ".tpmkey"
FORMAT_VERSION = "1"
TPM2_RH_OWNER = 0x40000001
_PEM_BEGIN = b"-----BEGIN TSS2 PRIVATE KEY-----"
_HEADER_RE = re.compile(r"^([a-z-]{1,32}): (.{0,300})$")

# TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3) -- kept numeric so the checks below
# read the same as the spec and as the pure verifier in core/tpm_evidence.py.
FIXED_TPM = 0x00000002
FIXED_PARENT = 0x00000010
SENSITIVE_DATA_ORIGIN = 0x00000020
USER_WITH_AUTH = 0x00000040
NO_DA = 0x00000400
RESTRICTED = 0x00010000
DECRYPT = 0x00020000
SIGN = 0x00040000
AGENT_KEY_REQUIRED = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | SIGN

# Response-code layers (TSS2 RC bits 16..23) and TPM codes we act on.
_LAYER_TPM = 0
_LAYER_ESAPI = 7
_LAYER_SYS = 8
_LAYER_MU = 9
_LAYER_TCTI = 10
_LAYER_RM = 11
_RC_INITIALIZE = 0x100
_RC_AUTH_FAIL = 0x08E
_RC_BAD_AUTH = 0x0A2
_RC_INTEGRITY = 0x09F
_RC_LOCKOUT = 0x921
_RC_OBJECT_MEMORY = 0x902
_RC_SESSION_MEMORY = 0x903
_TRANSIENT_WARNINGS = {0x908, 0x90A, 0x920, 0x922, 0x923}  # YIELDED TESTING NV_RATE RETRY NV_UNAVAILABLE
# REFERENCE_H0..H6 / S0..S6: a handle names an object or session the TPM no
# longer has -- it was restarted under a live context (the swtpm TCTI even
# reconnects to a new swtpm by itself). The context is stale: reconnect.
_STALE_REFERENCES = set(range(0x910, 0x917)) | set(range(0x918, 0x91F))
_TCTI_CONFIG_ERRORS = {0x15, 0x0B, 0x05, 0x03}  # NOT_SUPPORTED BAD_VALUE BAD_REFERENCE NOT_IMPLEMENTED
_TPMA_PERMANENT_IN_LOCKOUT = 0x200
SLOW_COMMAND_TIMEOUT = 60.0
"""RSA-2048 key generation (the EK, for credential activation) takes seconds on real TPMs."""
PING_TIMEOUT = 1.0
"""A health ping is one GetCapability, sent only by the health monitor."""


@dataclass(frozen=True)
class TpmConfig:
    """Typed config of this backend; nothing backend-specific reaches generate().

    ``tcti``: a tpm2-tools style TCTI string: ``device:/dev/tpmrm0`` (kernel
    resource manager, the production choice), ``tabrmd:``, or
    ``swtpm:path=/run/swtpm/sock`` for the software TPM.
    ``key_dir``: private directory (0700) holding one file per key.
    ``parent_handle``: persistent storage key to use as parent (e.g.
    ``0x81000001``) instead of re-creating the standard ECC SRK; needed when
    the owner hierarchy has a password.
    ``key_auth_file``: optional 0600 file with an auth value for agent keys;
    keys then become DA-protected (see the module docstring).
    ``cached_keys``: agent keys kept loaded between operations. Each costs a
    TPM object slot; swtpm has 3 (primary + cache + one for attestation).
    ``command_timeout``: seconds a caller waits for one TPM command (a real
    TPM signs in ~200 ms); past it the caller gets UNAVAILABLE and the TPM is
    *stuck* until that command returns (badged.keystore.watchdog).
    Commands that create RSA keys (credential activation) get
    ``SLOW_COMMAND_TIMEOUT``.
    """

    tcti: str
    key_dir: str
    parent_handle: int | None = None
    key_auth_file: str | None = None
    cached_keys: int = 1
    command_timeout: float = 3.0


def _rc_parts(rc: int) -> tuple[int, int]:
    """Split a TSS2 rc into (layer, base code without handle/param/session bits)."""
    layer = (rc >> 16) & 0xFF
    low = rc & 0xFFFF
    if layer == _LAYER_TPM and low & 0x80:  # format-one TPM error
        return layer, 0x80 | (low & 0x3F)
    return layer, low & 0xFFF


def _rc_of(exc: BaseException) -> int | None:
    rc = getattr(exc, "rc", None)
    return int(rc) if rc is not None else None


def translate(exc: BaseException, what: str) -> KeyStoreError:
    """Map a TSS2 exception to the port's errors, keeping the raw rc in hex.

    The split that matters to callers: *unavailable* (retry later, we
    reconnect), *auth* (never retried automatically), and plain failure.
    """
    rc = _rc_of(exc)
    if rc is None:
        return KeyStoreError(f"{what}: {type(exc).__name__}", backend=BACKEND, raw=type(exc).__name__)
    raw = f"0x{rc:x}"
    layer, code = _rc_parts(rc)
    if layer == _LAYER_TCTI:
        if code in _TCTI_CONFIG_ERRORS:
            return KeyStoreError(f"{what}: TCTI cannot be used ({exc})", backend=BACKEND, raw=raw)
        return KeyStoreUnavailableError(f"{what}: TPM unreachable ({exc})", backend=BACKEND, raw=raw)
    if layer in (_LAYER_ESAPI, _LAYER_SYS, _LAYER_RM, _LAYER_MU):
        # Lost/garbled response or a context left mid-command: the context is
        # unusable, a fresh one usually works.
        return KeyStoreUnavailableError(f"{what}: TSS failure ({exc})", backend=BACKEND, raw=raw)
    if layer == _LAYER_TPM:
        if code == _RC_LOCKOUT:
            return KeyStoreAuthError(
                f"{what}: TPM is in dictionary-attack lockout; it heals by itself after the "
                "lockout recovery time, or the owner resets it (tpm2_dictionarylockout -c)",
                backend=BACKEND, raw=raw)
        if code in (_RC_AUTH_FAIL, _RC_BAD_AUTH):
            return KeyStoreAuthError(f"{what}: authorization failed (wrong auth value)",
                                     backend=BACKEND, raw=raw)
        if code == _RC_INITIALIZE or code in _TRANSIENT_WARNINGS:
            return KeyStoreUnavailableError(f"{what}: TPM busy or not started ({exc})",
                                            backend=BACKEND, raw=raw)
        if code in _STALE_REFERENCES:
            return KeyStoreUnavailableError(f"{what}: TPM was reset (loaded objects gone)",
                                            backend=BACKEND, raw=raw)
        if code in (_RC_OBJECT_MEMORY, _RC_SESSION_MEMORY):
            return KeyStoreUnavailableError(f"{what}: TPM out of object/session slots",
                                            backend=BACKEND, raw=raw)
    return KeyStoreError(f"{what}: {exc}", backend=BACKEND, raw=raw)


def key_file_name(name: str) -> str:
    """File name for a key name: percent-encoded, so '/' and ':' are safe and
    '.'/'..' cannot occur (the ``k-`` prefix)."""
    return "k-" + urllib.parse.quote(name, safe="-_") + FILE_SUFFIX


def key_name_from_file(file_name: str) -> str | None:
    if not (file_name.startswith("k-") and file_name.endswith(FILE_SUFFIX)):
        return None
    return urllib.parse.unquote(file_name[2:-len(FILE_SUFFIX)])


def srk_template() -> Any:
    """The TCG storage-primary template for ECC P-256 (same as tpm2-tss-engine
    and tpm2-openssl use for parent 0x40000001), so key files interoperate."""
    from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
    from tpm2_pytss.types import (
        TPM2B_PUBLIC,
        TPMS_ECC_PARMS,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_SYM_DEF_OBJECT,
        TPMU_PUBLIC_PARMS,
        TPMU_SYM_KEY_BITS,
        TPMU_SYM_MODE,
    )

    attrs = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
             | TPMA_OBJECT.NODA | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN)
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs, authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                                          mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)),
            scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
        )),
    ))


def agent_key_template(da_protected: bool) -> Any:
    """Unrestricted ECC P-256 signing key: fixedTPM, fixedParent,
    sensitiveDataOrigin (generated inside, never imported), userWithAuth,
    sign only. Scheme NULL so one key can sign SHA-256/384/512 digests."""
    from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
    from tpm2_pytss.types import (
        TPM2B_PUBLIC,
        TPMS_ECC_PARMS,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_SYM_DEF_OBJECT,
        TPMU_PUBLIC_PARMS,
    )

    attrs = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
             | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN)
    if not da_protected:
        attrs |= TPMA_OBJECT.NODA
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs, authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
            scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
        )),
    ))


@dataclass
class _Blob:
    """A parsed key file: what Load needs plus what we check before trusting it."""

    name: str
    public: Any  # TPM2B_PUBLIC
    private: Any  # TPM2B_PRIVATE
    parent: str
    parent_name: str
    needs_auth: bool
    public_key: ec.EllipticCurvePublicKey


class _TpmKey:
    """Handle on a key file; every operation goes through the store's lock."""

    def __init__(self, store: TpmKeyStore, name: str, public: ec.EllipticCurvePublicKey) -> None:
        self._store = store
        self._name = name
        self._public = public

    @property
    def name(self) -> str:
        return self._name

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        hash_name, digest = digest_for(data, signature_algorithm, backend=BACKEND)
        return self._store._sign_digest(self._name, digest, hash_name, self._public)


# -- attestation ---------------------------------------------------------------------------

EK_CERT_RSA_INDEX = 0x01C00002
EK_CERT_ECC_INDEX = 0x01C00016  # swtpm 0.7: ECC P-384 EK (0x01c0000a is absent)
EK_RSA_PERSISTENT = 0x81010001
_NONCE_MIN, _NONCE_MAX = 8, 64


def ak_template() -> Any:
    """The attestation key: a *restricted* ECC P-256 signing key.

    Restricted means the TPM signs with it only digests it computed itself
    (TPMS_ATTEST it generated, or data that carries no TPM magic), so nobody
    can make it sign a forged attestation. It is a primary of the endorsement
    hierarchy: derived from the same seed as the EK, re-created identically on
    every call, so a verifier that pinned its Name once keeps recognising it
    and nothing has to be stored.
    """
    from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
    from tpm2_pytss.types import (
        TPM2B_PUBLIC,
        TPMS_ECC_PARMS,
        TPMS_SCHEME_HASH,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_SYM_DEF_OBJECT,
        TPMU_ASYM_SCHEME,
        TPMU_PUBLIC_PARMS,
    )

    attrs = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT
             | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.NODA)
    return TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
        type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs, authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
            scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA,
                                   details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))),
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
        )),
    ))


def _nv_read_all(ectx: Any, index: int) -> bytes:
    """Read a whole NV index in chunks (TPMs cap one read at ~1 KB)."""
    nv = ectx.tr_from_tpmpublic(index)
    pub, _ = ectx.nv_read_public(nv)
    size = int(pub.nvPublic.dataSize)
    out = bytearray()
    while len(out) < size:
        chunk = ectx.nv_read(nv, min(768, size - len(out)), len(out), auth_handle=nv)
        out += bytes(chunk)
    return bytes(out)


class TpmKeyStore:
    """Agent keys as TPM child keys of one storage primary, behind one lock."""

    backend = BACKEND

    def __init__(self, config: TpmConfig, *, key_auth: bytes | None = None,
                 esapi_factory: Callable[[str], Any] | None = None) -> None:
        self._config = config
        self._key_dir = Path(config.key_dir)
        self._key_auth = key_auth
        self._cache_size = config.cached_keys
        self._esapi_factory = esapi_factory
        self._lock = threading.RLock()
        self._ectx: Any = None
        self._primary: Any = None
        self._primary_name = ""
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._blobs: dict[str, _Blob] = {}
        # A wrong auth value is reported once, then refused without asking the
        # TPM again: each attempt would count towards dictionary-attack lockout.
        self._auth_latch: KeyStoreAuthError | None = None
        self._lockout_warned = False
        self._ek_cert_cache: bytes | None = None
        self._ek_cert_read = False
        # Bumped at every (re)connect: lets health checks and tests see recoveries.
        self.generation = 0
        # Why the last command failed for want of a TPM (None once one succeeds).
        self._down: str | None = None
        self._timeout = config.command_timeout
        # Every command goes through this one thread: a hung TPM holds only it.
        self._worker = DeviceWorker("badged-tpm", backend=BACKEND)
        try:
            self._worker.call("connecting to the TPM", self._connect_locked, self._timeout)
        except BaseException:
            self._worker.stop(0)
            raise

    @classmethod
    def from_config(cls, config: TpmConfig) -> TpmKeyStore:
        if not config.tcti or (":" not in config.tcti and config.tcti not in ("device", "tabrmd", "swtpm")):
            raise ConfigError(f"TCTI {config.tcti!r} is not of the form name:conf "
                              "(e.g. device:/dev/tpmrm0, swtpm:path=/run/swtpm/sock)")
        if not 0 <= config.cached_keys <= 8:
            raise ConfigError("cached_keys must be between 0 and 8")
        if not 0.05 <= config.command_timeout <= 600:
            raise ConfigError("command_timeout must be between 0.05 and 600 seconds")
        if config.parent_handle is not None and not 0x81000000 <= config.parent_handle <= 0x817FFFFF:
            raise ConfigError(f"parent_handle 0x{config.parent_handle:x} is not a persistent handle")
        ensure_private_dir(Path(config.key_dir))
        auth = None
        if config.key_auth_file:
            auth = read_secret_file(config.key_auth_file).reveal().encode()
            if len(auth) > 32:
                raise ConfigError("key auth value is longer than 32 bytes", path=config.key_auth_file)
        try:
            return cls(config, key_auth=auth)
        except KeyStoreError as exc:
            if not isinstance(exc, KeyStoreUnavailableError | KeyStoreAuthError) and exc.raw \
                    and exc.raw.startswith("0xa00"):
                raise ConfigError(f"TCTI {config.tcti!r}: {exc.detail}") from None
            raise

    # -- context management (call with the lock held) -----------------------------

    def _new_esapi(self) -> Any:
        if self._esapi_factory is not None:
            return self._esapi_factory(self._config.tcti)
        from tpm2_pytss import ESAPI

        return ESAPI(self._config.tcti)

    def _connect_locked(self) -> None:
        with self._lock:
            try:
                self._connect()
            except KeyStoreUnavailableError as exc:
                self._down = exc.detail
                raise
            self._down = None

    def _connect(self) -> None:
        """Open a fresh ESAPI context and (re-)create the storage primary."""
        from tpm2_pytss import TSS2_Exception
        from tpm2_pytss.constants import ESYS_TR, TPM2_SU
        from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

        try:
            ectx = self._new_esapi()
        except TSS2_Exception as exc:
            raise translate(exc, f"opening TCTI {self._config.tcti}") from None
        try:
            for attempt in range(3):
                try:
                    if self._config.parent_handle is not None:
                        primary = ectx.tr_from_tpmpublic(self._config.parent_handle)
                    else:
                        primary, _, _, _, _ = ectx.create_primary(
                            TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER)
                    break
                except TSS2_Exception as exc:
                    _, code = _rc_parts(int(exc.rc))
                    if attempt < 2 and code == _RC_INITIALIZE:
                        # A TPM straight after power-on (or a bare simulator).
                        _logger.info("TPM not started; sending TPM2_Startup(CLEAR)")
                        ectx.startup(TPM2_SU.CLEAR)
                        continue
                    if attempt < 2 and code == _RC_OBJECT_MEMORY:
                        self._flush_stale(ectx)
                        continue
                    raise
            name = bytes(ectx.tr_get_name(primary)).hex()
        except TSS2_Exception as exc:
            try:
                ectx.close()
            except Exception:
                _logger.debug("closing ESAPI after a failed connect failed", exc_info=True)
            err = translate(exc, "creating the storage primary")
            if isinstance(err, KeyStoreAuthError) and "lockout" not in err.detail:
                err = KeyStoreAuthError(
                    "the owner hierarchy has a password: provision a persistent storage key "
                    "(tpm2_createprimary + tpm2_evictcontrol) and set parent_handle", backend=BACKEND,
                    raw=err.raw)
            raise err from None
        self._ectx, self._primary, self._primary_name = ectx, primary, name
        self._loaded.clear()
        self.generation += 1
        _logger.info("tpm connected", extra={"tcti": self._config.tcti, "srk_name": name})

    @staticmethod
    def _flush_stale(ectx: Any) -> None:
        """Free transient objects a crashed predecessor left behind.

        Without a resource manager (swtpm, /dev/tpm0) nothing frees them, and
        with 3 slots the TPM is then unusable. Only reached when the TPM said
        it is out of object memory, so it cannot steal a live user's objects
        on a shared TPM (those go through a resource manager anyway).
        """
        from tpm2_pytss.constants import TPM2_CAP, TPM2_HC

        _more, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 16)
        handles = [int(h) for h in data.data.handles.handle[0:data.data.handles.count]]
        _logger.warning("TPM out of object slots; flushing %d stale transient objects", len(handles))
        for handle in handles:
            tr = ectx.tr_from_tpmpublic(handle)
            ectx.flush_context(tr)

    def _drop_context(self) -> None:
        """Forget the context after a fault, flushing what we can first."""
        ectx, self._ectx = self._ectx, None
        if ectx is None:
            return
        handles = list(self._loaded.values())
        if self._config.parent_handle is None and self._primary is not None:
            handles.append(self._primary)
        self._loaded.clear()
        self._primary = None
        for handle in handles:
            try:
                ectx.flush_context(handle)
            except Exception:  # the TPM is most likely gone, and its objects with it
                break
        try:
            ectx.close()
        except Exception:
            _logger.debug("ESAPI close failed", exc_info=True)

    def _call(self, what: str, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        """Run ``fn(esapi)`` on the TPM thread; reconnect first if the last call failed.

        No automatic retry inside one call: a caller sees UNAVAILABLE at once
        (fail closed), and the next call starts from a fresh context. The
        caller waits at most ``timeout`` (``command_timeout``); a TPM that
        does not answer holds the TPM thread, never the caller.
        """
        if self._auth_latch is not None:
            raise self._auth_latch
        return self._worker.call(what, lambda: self._call_locked(what, fn),
                                 self._timeout if timeout is None else timeout)

    def _call_locked(self, what: str, fn: Callable[[Any], T]) -> T:
        from tpm2_pytss import TSS2_Exception

        with self._lock:
            if self._auth_latch is not None:
                raise self._auth_latch
            if self._ectx is None:
                self._connect_locked()
            try:
                result = fn(self._ectx)
            except TSS2_Exception as exc:
                err = translate(exc, what)
                if isinstance(err, KeyStoreUnavailableError):
                    self._down = err.detail
                    self._drop_context()
                _logger.warning("tpm operation failed", extra={"op": what, "rc": err.raw})
                raise err from None
            self._down = None
            return result

    def problem(self) -> str | None:
        """Why the TPM cannot sign now, or None; reads state only (health checks).

        Never waits for the TPM or its lock, so health and JWKS answer while a
        command hangs.
        """
        stuck = self._worker.problem()
        if stuck is not None:
            return f"TPM not answering: {stuck}"
        if self._auth_latch is not None:
            return "TPM refused the key auth value (restart with the right key_auth_file)"
        down = self._down
        return f"TPM unreachable: {down}" if down is not None else None

    def _key_auth_call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one TPM command whose session 1 is the agent key's auth value.

        A wrong value there latches the store: the error is reported now and
        every later call is refused without asking the TPM, so a bad
        ``key_auth_file`` costs one DA try, not one per request. Auth failures
        of other entities (a hierarchy password) are not latched: they do
        not count towards lockout and may be fixed by the operator any time.
        """
        from tpm2_pytss import TSS2_Exception

        try:
            return fn()
        except TSS2_Exception as exc:
            rc = int(exc.rc)
            layer, code = _rc_parts(rc)
            session = (rc >> 8) & 0x7 if rc & 0x800 and not rc & 0x40 else 0
            if layer == _LAYER_TPM and code in (_RC_AUTH_FAIL, _RC_BAD_AUTH) and session == 1:
                self._auth_latch = KeyStoreAuthError(
                    f"{what}: the TPM refused the configured key auth value; not retrying until the "
                    "daemon restarts with the right key_auth_file", backend=BACKEND, raw=f"0x{rc:x}")
                _logger.error("tpm key auth failed; refusing further attempts", extra={"rc": f"0x{rc:x}"})
                raise self._auth_latch from None
            raise

    # -- key files ---------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self._key_dir / key_file_name(name)

    def _read_blob(self, name: str) -> _Blob:
        """Parse and sanity-check a key file; a bad file gets a reason, not a TPM rc."""
        cached = self._blobs.get(name)
        if cached is not None:
            return cached
        path = self._path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyNotFoundError(f"key {name} not found", backend=BACKEND) from None
        except OSError as exc:
            raise KeyStoreError(f"cannot read key file {path}: {exc.strerror}", backend=BACKEND) from None
        blob = self._parse_blob(name, path, data)
        self._blobs[name] = blob
        return blob

    def _parse_blob(self, name: str, path: Path, data: bytes) -> _Blob:
        from tpm2_pytss.tsskey import TSSPrivKey

        def corrupt(reason: str) -> KeyStoreError:
            return KeyStoreError(f"key file {path} is corrupted or not a badged TPM key: {reason}",
                                 backend=BACKEND)

        start = data.find(_PEM_BEGIN)
        if start < 0:
            raise corrupt("no TSS2 PRIVATE KEY block")
        headers: dict[str, str] = {}
        try:
            for line in data[:start].decode("ascii").splitlines():
                m = _HEADER_RE.match(line)
                if m is None:
                    raise corrupt(f"bad header line {line[:40]!r}")
                headers[m.group(1)] = m.group(2)
        except UnicodeDecodeError:
            raise corrupt("header is not ASCII") from None
        if headers.get("badged-tpm-key") != FORMAT_VERSION:
            raise corrupt(f"unsupported format {headers.get('badged-tpm-key')!r}")
        if headers.get("name") != name:
            raise corrupt(f"file is for key {headers.get('name')!r}, not {name!r}")
        try:
            tss = TSSPrivKey.from_pem(data[start:])
        except Exception as exc:  # asn1 / base64 / TPM unmarshal errors: all mean "bad bytes"
            raise corrupt(f"{type(exc).__name__}: {exc}") from None
        area = tss.public.publicArea
        attrs = int(area.objectAttributes)
        if int(area.type) != 0x0023 or int(area.parameters.eccDetail.curveID) != 0x0003:
            raise corrupt("not an ECC P-256 key")
        if attrs & AGENT_KEY_REQUIRED != AGENT_KEY_REQUIRED or attrs & (DECRYPT | RESTRICTED):
            raise corrupt(f"object attributes 0x{attrs:08x} are not those of a badged signing key")
        public = serialization.load_pem_public_key(tss.public.to_pem())
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise corrupt("public area is not an EC key")
        return _Blob(name=name, public=tss.public, private=tss.private,
                     parent=headers.get("parent", ""), parent_name=headers.get("parent-name", ""),
                     needs_auth=not tss.empty_auth, public_key=public)

    def _parent_label(self) -> str:
        if self._config.parent_handle is None:
            return "srk-ecc-p256"
        return f"0x{self._config.parent_handle:08x}"

    def _write_blob(self, name: str, public: Any, private: Any) -> bytes:
        from tpm2_pytss.tsskey import TSSPrivKey

        parent = TPM2_RH_OWNER if self._config.parent_handle is None else self._config.parent_handle
        tss = TSSPrivKey(private, public, empty_auth=self._key_auth is None, parent=parent)
        header = (f"badged-tpm-key: {FORMAT_VERSION}\nname: {name}\nparent: {self._parent_label()}\n"
                  f"parent-name: {self._primary_name}\n").encode()
        data = header + bytes(tss.to_pem())
        atomic_write(self._path(name), data, 0o600)
        return data

    # -- loading (lock held) ---------------------------------------------------------

    def _loaded_handle(self, ectx: Any, blob: _Blob) -> Any:
        """Load ``blob`` (or reuse a cached handle), evicting to stay within slots."""
        handle = self._loaded.get(blob.name)
        if handle is not None:
            self._loaded.move_to_end(blob.name)
            return handle
        moved = blob.parent_name and blob.parent_name != self._primary_name
        if blob.parent != self._parent_label() or moved:
            raise KeyStoreError(
                f"key {blob.name} was made under another storage key ({blob.parent} "
                f"{blob.parent_name[:16]}…, now {self._parent_label()} {self._primary_name[:16]}…): "
                "TPM cleared, another TPM, or parent_handle changed", backend=BACKEND)
        if blob.needs_auth and self._key_auth is None:
            raise KeyStoreAuthError(f"key {blob.name} needs an auth value; set key_auth_file",
                                    backend=BACKEND)
        while self._loaded and len(self._loaded) >= max(self._cache_size, 1):
            _, old = self._loaded.popitem(last=False)
            ectx.flush_context(old)
        from tpm2_pytss import TSS2_Exception

        try:
            handle = ectx.load(self._primary, blob.private, blob.public)
        except TSS2_Exception as exc:
            layer, code = _rc_parts(int(exc.rc))
            if layer == _LAYER_TPM and code & 0x80 and code not in (_RC_AUTH_FAIL, _RC_BAD_AUTH):
                raise KeyStoreError(
                    f"TPM rejected the blob of key {blob.name} ({exc}): file corrupted, or made by "
                    "another TPM / under another parent", backend=BACKEND, raw=f"0x{int(exc.rc):x}"
                ) from None
            raise
        if blob.needs_auth:
            ectx.tr_set_auth(handle, self._key_auth)
        self._loaded[blob.name] = handle
        return handle

    def _release(self, ectx: Any, name: str) -> None:
        """Flush a key unless the cache may keep it."""
        if len(self._loaded) > self._cache_size:
            handle = self._loaded.pop(name, None)
            if handle is not None:
                ectx.flush_context(handle)

    @contextmanager
    def _using(self, ectx: Any, blob: _Blob) -> Iterator[Any]:
        handle = self._loaded_handle(ectx, blob)
        try:
            yield handle
        finally:
            self._release(ectx, blob.name)

    def _evict(self, ectx: Any, keep: str | None = None) -> None:
        for name in [n for n in self._loaded if n != keep]:
            ectx.flush_context(self._loaded.pop(name))

    # -- the port -----------------------------------------------------------------------

    def generate(self, name: str, algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> KeyHandle:
        check_key_name(name)
        if algorithm is not KeyAlgorithm.EC_P256:
            raise KeyStoreError(f"unsupported algorithm {algorithm.value}", backend=BACKEND)
        from tpm2_pytss.types import TPM2B_AUTH, TPM2B_SENSITIVE_CREATE, TPMS_SENSITIVE_CREATE

        def op(ectx: Any) -> KeyHandle:
            if self._path(name).exists():
                raise KeyExistsError(f"key {name} exists", backend=BACKEND)
            sensitive = TPM2B_SENSITIVE_CREATE()
            if self._key_auth is not None:
                sensitive = TPM2B_SENSITIVE_CREATE(
                    sensitive=TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(self._key_auth)))
            # Create needs a free slot for the new object: drop cached keys.
            self._evict(ectx)
            private, public, _, _, _ = ectx.create(
                self._primary, sensitive, agent_key_template(self._key_auth is not None))
            data = self._write_blob(name, public, private)
            self._blobs.pop(name, None)
            blob = self._parse_blob(name, self._path(name), data)
            self._blobs[name] = blob
            _logger.info("tpm key generated", extra={"key": name})
            return _TpmKey(self, name, blob.public_key)

        return self._call(f"generating key {name}", op)

    def get(self, name: str) -> KeyHandle:
        """A handle from the key file (cached): no TPM command and no lock, so
        JWKS, health and admin never wait behind a signature (or a hung TPM)."""
        check_key_name(name)
        blob = self._read_blob(name)
        return _TpmKey(self, name, blob.public_key)

    def list(self) -> Sequence[str]:
        try:
            entries = os.listdir(self._key_dir)
        except OSError as exc:
            raise KeyStoreError(f"cannot list {self._key_dir}: {exc.strerror}", backend=BACKEND) from None
        names = (key_name_from_file(e) for e in entries)
        return sorted(n for n in names if n is not None)

    def destroy(self, name: str) -> None:
        """Delete the key file. The TPM keeps nothing, so without the file (and
        any backup of it) the key can never be loaded again."""
        check_key_name(name)
        # The file goes first, without the TPM: a hung TPM cannot keep a
        # destroyed key usable. Freeing its slot is done on the TPM thread.
        self._blobs.pop(name, None)
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            raise KeyNotFoundError(f"key {name} not found", backend=BACKEND) from None
        _logger.info("tpm key destroyed", extra={"key": name})

        def flush() -> None:
            with self._lock:
                self._blobs.pop(name, None)
                handle = self._loaded.pop(name, None)
                if handle is not None and self._ectx is not None:
                    try:
                        self._ectx.flush_context(handle)
                    except Exception:
                        _logger.debug("flush of destroyed key failed", exc_info=True)

        try:
            self._worker.call(f"unloading key {name}", flush, self._timeout)
        except KeyStoreUnavailableError:
            _logger.warning("destroyed key file; TPM did not answer the flush", extra={"key": name})

    def relabel(self, name: str, new_name: str) -> None:
        """Rename a key file (quarantine instead of destroying): header and file name."""
        check_key_name(name)
        check_key_name(new_name)
        with self._lock:
            if self._path(new_name).exists():
                raise KeyExistsError(f"key {new_name} exists", backend=BACKEND)
            self._read_blob(name)  # KeyNotFoundError; checks the header names it
            data = self._path(name).read_bytes()
            old_line, new_line = f"\nname: {name}\n".encode(), f"\nname: {new_name}\n".encode()
            if old_line not in data:
                raise KeyStoreError(f"key file of {name} has no name header", backend=BACKEND)
            atomic_write(self._path(new_name), data.replace(old_line, new_line, 1), 0o600)
            handle = self._loaded.pop(name, None)
            self._blobs.pop(name, None)
            if handle is not None and self._ectx is not None:
                try:
                    self._ectx.flush_context(handle)
                except Exception:
                    _logger.debug("flush of relabelled key failed", exc_info=True)
            os.unlink(self._path(name))
            _logger.info("tpm key relabelled", extra={"key": name, "as": new_name})

    def properties(self, name: str) -> KeyProperties:
        """Attributes as the TPM reports them for the loaded object (ReadPublic)."""
        check_key_name(name)

        def op(ectx: Any) -> KeyProperties:
            blob = self._read_blob(name)
            with self._using(ectx, blob) as handle:
                public, tpm_name, _ = ectx.read_public(handle)
            attrs = int(public.publicArea.objectAttributes)
            fixed = bool(attrs & FIXED_TPM) and bool(attrs & FIXED_PARENT)
            origin = bool(attrs & SENSITIVE_DATA_ORIGIN)
            return KeyProperties(
                backend=BACKEND, sensitive=True, extractable=not fixed,
                never_extractable=fixed and origin, local=origin,
                extra={"tpm_name": bytes(tpm_name).hex(), "object_attributes": f"0x{attrs:08x}",
                       "parent": self._parent_label(), "da_protected": str(not attrs & NO_DA).lower()},
            )

        self._read_blob(name)  # KeyNotFound / corrupt without touching the TPM
        return self._call(f"reading key {name}", op)

    def ping(self) -> None:
        """Prove the TPM answers now; report a lockout that blocks our keys."""
        from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

        def op(ectx: Any) -> None:
            _more, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.PERMANENT, 1)
            props = data.data.tpmProperties
            value = int(props.tpmProperty[0].value) if props.count else 0
            if value & _TPMA_PERMANENT_IN_LOCKOUT:
                if self._key_auth is not None:
                    raise KeyStoreAuthError("TPM is in dictionary-attack lockout", backend=BACKEND,
                                            raw="inLockout")
                if not self._lockout_warned:
                    self._lockout_warned = True
                    _logger.warning("TPM is in dictionary-attack lockout (agent keys are noDA: unaffected)")

        self._call("ping", op, timeout=min(self._timeout, PING_TIMEOUT))

    def close(self) -> None:
        def drop() -> None:
            with self._lock:
                self._drop_context()

        try:
            self._worker.call("closing", drop, self._timeout)
        except KeyStoreUnavailableError:
            _logger.warning("TPM did not answer at close; leaving its context behind")
        self._worker.stop()
        self._blobs.clear()

    # -- signing (through _TpmKey) -------------------------------------------------------

    def _sign_digest(self, name: str, digest: bytes, hash_name: str,
                     expected: ec.EllipticCurvePublicKey) -> bytes:
        from tpm2_pytss.constants import TPM2_ALG
        from tpm2_pytss.types import (
            TPM2B_DIGEST,
            TPMS_SCHEME_HASH,
            TPMT_SIG_SCHEME,
            TPMU_SIG_SCHEME,
        )

        alg = {"sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384, "sha512": TPM2_ALG.SHA512}.get(hash_name)
        if alg is None:
            raise KeyStoreError(f"unsupported hash {hash_name}", backend=BACKEND)
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA,
                                 details=TPMU_SIG_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=alg)))

        def op(ectx: Any) -> bytes:
            blob = self._read_blob(name)
            if blob.public_key.public_numbers() != expected.public_numbers():
                # The name was destroyed and re-generated: this handle's key is gone.
                raise KeyNotFoundError(f"key {name} was replaced", backend=BACKEND)
            with self._using(ectx, blob) as handle:
                sig = self._key_auth_call(f"signing with key {name}",
                                          lambda: ectx.sign(handle, TPM2B_DIGEST(digest), scheme))
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            return encode_dss_signature(r, s)

        return self._call(f"signing with key {name}", op)

    # -- attestation (optional capability: KeyAttester) ------------------------------

    # -- sealing (SecretSealer) ----------------------------------------------------------

    def _sealed_path(self, key_name: str) -> Path:
        # "s-" prefix: never a key file (list() and start-up reconcile ignore it).
        return self._key_dir / ("s-" + urllib.parse.quote(key_name, safe="-_") + ".sealed")

    def _dek(self, key_name: str, *, create: bool) -> bytes:
        """The data key sealed in a TPM keyedhash object under the storage key.

        The object is fixedTPM/fixedParent, so its file opens only on this
        TPM under this parent; TPM2_Unseal returns the 32 bytes for one use.
        """
        from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
        from tpm2_pytss.types import (
            TPM2B_PRIVATE,
            TPM2B_PUBLIC,
            TPM2B_SENSITIVE_CREATE,
            TPM2B_SENSITIVE_DATA,
            TPMS_KEYEDHASH_PARMS,
            TPMS_SENSITIVE_CREATE,
            TPMT_KEYEDHASH_SCHEME,
            TPMT_PUBLIC,
            TPMU_PUBLIC_PARMS,
        )

        path = self._sealed_path(key_name)

        def op(ectx: Any) -> bytes:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = b""
            if not data:
                if not create:
                    raise KeyNotFoundError(f"sealing key {key_name} not found", backend=BACKEND)
                dek = secrets.token_bytes(32)
                attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                         | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
                template = TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(
                    type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs,
                    authPolicy=b"", parameters=TPMU_PUBLIC_PARMS(keyedHashDetail=TPMS_KEYEDHASH_PARMS(
                        scheme=TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL)))))
                sensitive = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(
                    data=TPM2B_SENSITIVE_DATA(dek)))
                self._evict(ectx)
                private, public, _, _, _ = ectx.create(self._primary, sensitive, template)
                pub, priv = bytes(public.marshal()), bytes(private.marshal())
                atomic_write(path, len(pub).to_bytes(2, "big") + pub + priv, 0o600)
                return dek
            if len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
                raise KeyStoreError(f"sealed key file {path} is corrupted", backend=BACKEND)
            n = int.from_bytes(data[:2], "big")
            public, _ = TPM2B_PUBLIC.unmarshal(data[2:2 + n])
            private, _ = TPM2B_PRIVATE.unmarshal(data[2 + n:])
            self._evict(ectx)
            handle = ectx.load(self._primary, private, public)
            try:
                return bytes(ectx.unseal(handle))
            finally:
                ectx.flush_context(handle)

        dek: bytes = self._call(f"unsealing {key_name}", op)
        return dek

    def seal(self, key_name: str, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM under a data key sealed in the TPM (see ``_dek``)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        check_key_name(key_name)
        nonce = secrets.token_bytes(12)
        return nonce + AESGCM(self._dek(key_name, create=True)).encrypt(nonce, plaintext, aad)

    def unseal(self, key_name: str, blob: bytes, aad: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        check_key_name(key_name)
        if len(blob) < 12 + 16:
            raise KeyStoreError("sealed blob too short", backend=BACKEND)
        try:
            return AESGCM(self._dek(key_name, create=False)).decrypt(blob[:12], blob[12:], aad)
        except InvalidTag:
            raise KeyStoreError("sealed blob does not open (tampered, moved, or another "
                                "TPM's)", backend=BACKEND) from None

    def ak_public(self) -> bytes:
        """Marshaled TPMT_PUBLIC of the AK: what a verifier needs for MakeCredential."""

        def op(ectx: Any) -> bytes:
            self._evict(ectx)
            with self._ak(ectx) as (_, public):
                return bytes(public.publicArea.marshal())

        return self._call("reading the attestation key", op)

    @contextmanager
    def _ak(self, ectx: Any) -> Iterator[tuple[Any, Any]]:
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

        handle, public, _, _, _ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), ak_template(),
                                                      ESYS_TR.ENDORSEMENT)
        try:
            yield handle, public
        finally:
            ectx.flush_context(handle)

    def attest(self, name: str, nonce: bytes) -> KeyAttestation:
        """TPM2_Certify of key ``name`` by the AK over the verifier's nonce."""

        check_key_name(name)
        if not _NONCE_MIN <= len(nonce) <= _NONCE_MAX:
            raise InvalidRequestError(f"nonce must be {_NONCE_MIN}..{_NONCE_MAX} bytes")
        from tpm2_pytss.constants import TPM2_ALG
        from tpm2_pytss.types import TPM2B_DATA, TPMT_SIG_SCHEME

        def op(ectx: Any) -> KeyAttestation:
            blob = self._read_blob(name)
            # Certify needs primary + key + AK: exactly swtpm's 3 slots.
            self._evict(ectx, keep=name)
            with self._using(ectx, blob) as key, self._ak(ectx) as (ak, ak_pub):
                info, sig = self._key_auth_call(f"attesting key {name}", lambda: ectx.certify(
                    key, ak, TPM2B_DATA(nonce), TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)))
            if int(sig.sigAlg) != int(TPM2_ALG.ECDSA):
                raise KeyStoreError("AK signed with an unexpected scheme", backend=BACKEND)
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            return KeyAttestation(
                format=FORMAT_TPM2_CERTIFY, key_name=name, nonce=bytes(nonce),
                attest=bytes(info),
                signature=encode_dss_signature(r, s),
                ak_public=bytes(ak_pub.publicArea.marshal()),
                key_public=bytes(blob.public.publicArea.marshal()),
                ek_certificate=self._ek_cert(ectx),
            )

        self._read_blob(name)  # not-found / corrupt without touching the TPM
        return self._call(f"attesting key {name}", op)

    def ek_certificate(self) -> bytes | None:
        """DER EK certificate (RSA 2048 first, the one activation uses), or None."""
        return self._call("reading the EK certificate", self._ek_cert)

    def _ek_cert(self, ectx: Any) -> bytes | None:
        if self._ek_cert_read:
            return self._ek_cert_cache
        from tpm2_pytss import TSS2_Exception

        cert = None
        for index in (EK_CERT_RSA_INDEX, EK_CERT_ECC_INDEX):
            try:
                cert = _nv_read_all(ectx, index)
                break
            except TSS2_Exception as exc:
                if _rc_parts(int(exc.rc))[0] != _LAYER_TPM:
                    raise
                _logger.debug("no EK certificate at 0x%08x (rc 0x%x)", index, int(exc.rc))
        if cert is None:
            _logger.warning("TPM has no EK certificate in NV: attestation cannot be chained to a CA")
        self._ek_cert_cache, self._ek_cert_read = cert, True
        return cert

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK and the RSA EK.

        The verifier made (credential_blob, encrypted_secret) with
        ``tpm_evidence.make_credential`` for the EK of the certificate and the
        AK's Name; only the TPM holding that EK *and* that AK can return the
        secret, which ties the AK to the EK certificate.
        """
        from tpm2_pytss import TSS2_Exception
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
        from tpm2_pytss.types import TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPMT_SYM_DEF

        try:
            blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        except Exception:

            raise InvalidRequestError("malformed credential challenge") from None

        def op(ectx: Any) -> bytes:
            self._evict(ectx)
            ek = self._ek_handle(ectx)
            created_ek = not isinstance(ek, tuple)
            ek_handle = ek if created_ek else ek[0]
            try:
                with self._ak(ectx) as (ak, _):
                    session = ectx.start_auth_session(
                        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
                    try:
                        # The standard EK policy: PolicySecret(endorsement hierarchy).
                        ectx.policy_secret(ESYS_TR.ENDORSEMENT, session, expiration=0)
                        out = ectx.activate_credential(ak, ek_handle, blob, secret,
                                                       session1=ESYS_TR.PASSWORD, session2=session)
                    finally:
                        try:
                            ectx.flush_context(session)
                        except TSS2_Exception:
                            pass  # a policy session used by a command may already be gone
            finally:
                if created_ek:
                    ectx.flush_context(ek_handle)
            return bytes(out)

        try:
            return self._call("activating a credential", op, timeout=SLOW_COMMAND_TIMEOUT)
        except KeyStoreError as exc:
            if isinstance(exc, KeyStoreUnavailableError | KeyStoreAuthError):
                raise
            raise AttestationError(f"credential activation failed: {exc.detail}", raw=exc.raw) from None

    def _ek_handle(self, ectx: Any) -> Any:
        """The RSA EK: persistent at 0x81010001 if provisioned, else re-created
        from the TCG EK template (which reproduces the certified key)."""
        from tpm2_pytss import TSS2_Exception
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.utils import NoSuchIndex, create_ek_template

        try:
            return (ectx.tr_from_tpmpublic(EK_RSA_PERSISTENT),)
        except TSS2_Exception as exc:
            if _rc_parts(int(exc.rc))[0] != _LAYER_TPM:
                raise

        def nv_read(index: int) -> bytes:
            try:
                return _nv_read_all(ectx, int(index))
            except TSS2_Exception as exc:
                raise NoSuchIndex(index) from exc

        _, template = create_ek_template("EK-RSA2048", nv_read)
        handle, _, _, _, _ = ectx.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        return handle
