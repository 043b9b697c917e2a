"""PKCS#11 key store over python-pkcs11, tested against SoftHSM.

Three hardware facts shape this module (measured, see FINDINGS §2):

* python-pkcs11 calls ``C_Initialize(NULL)``, so SoftHSM runs with *no*
  internal locking. Two threads inside the module crash it. Every call into
  the library therefore happens under ``self._lock``.
* ``Session.close()`` logs out every session of the process and a second
  ``C_Login`` fails, so the store holds exactly one logged-in R/W session for
  its whole life, and re-opens it only after the token went away.
* Finding a key costs more than signing with it, so handles are cached.
* SoftHSM re-reads a token object's file (about 20 syscalls, with locks) and
  decrypts the key on every signature; a *session copy* (``C_CopyObject``
  with ``CKA_TOKEN=false``, still sensitive and unextractable, inside the
  token) signs without either: ~30 µs less CPU per signature in the daemon.
  How copies stay under control: :meth:`Pkcs11KeyStore._session_copy`.

Deadlines (a :class:`~badged.keystore.watchdog.CallGuard`): every call waits
for the token's lock at most ``command_timeout`` and fails at once while a
call has held it longer, so a call hung in the module on some thread (an
audit checkpoint, a health ping) costs other callers UNAVAILABLE, not a hang,
and health reports the token as not answering. What it cannot cover: the
call that hangs itself. Signatures run inline on the event loop for speed
(~65 µs, less than a thread hand-off); SoftHSM works in process memory and
local files and cannot hang short of the disk, so a module that talks to a
network or USB HSM should be run with signing off the loop (docs/tpm.md).

SoftHSM 2.6 has no CKM_ECDSA_SHA256: we hash in software and sign the digest
with raw CKM_ECDSA, then DER-encode r||s to match ``cryptography``.
"""

from __future__ import annotations

import builtins
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from badged.errors import (
    ConfigError,
    KeyExistsError,
    KeyNotFoundError,
    KeyStoreAuthError,
    KeyStoreError,
    KeyStoreUnavailableError,
)
from badged.keystore.port import (
    KeyAlgorithm,
    KeyHandle,
    KeyProperties,
    check_key_name,
    digest_for,
)
from badged.keystore.uri import Pkcs11Uri, parse_pkcs11_uri
from badged.keystore.watchdog import CallGuard
from badged.secrets import Secret, read_secret_file

_logger = logging.getLogger(__name__)

_P256_OID = "1.2.840.10045.3.1.7"
LIVENESS_S = 0.1
"""How long a session copy may sign without the token object being seen alive."""
EARLY_LIST_S = 60.0
"""How long after the store took over the prefetch thread's session its list may answer
list() (start-up's reconcile comes within a second or two; nothing later uses it)."""
T = TypeVar("T")


@dataclass(frozen=True)
class Pkcs11Config:
    """Typed config of this backend; nothing backend-specific reaches generate()."""

    uri: str
    module_path: str | None = None
    session_key_copies: bool = True
    command_timeout: float = 3.0

    def parsed(self) -> Pkcs11Uri:
        return parse_pkcs11_uri(self.uri)


_prefetching: dict[str, threading.Thread] = {}
_early: dict[str, _Early] = {}


@dataclass
class _Early:
    """What a prefetch thread did ahead of the store, for the store to take over once."""

    uri: Pkcs11Uri
    go: threading.Event | None
    lib: Any = None
    session: Any = None
    login_error: BaseException | None = None  # never retried: it counts against the PIN
    labels: builtins.list[str] | None = None
    pairs: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def prefetch(config: object, *, login_after: threading.Event | None = None,
             preload: tuple[str, ...] = ()) -> None:
    """Start loading and initialising the PKCS#11 module on a thread, now.

    ``C_Initialize`` of a file-backed token reads every object (SoftHSM with
    1,000 agents: 6,000 object files, a large share of the daemon's start)
    and runs without the GIL; called before the daemon imports the rest of
    itself, it overlaps that import time (issue 22). The store waits for it
    before its own first call, and any failure here is left for the store to
    meet and report the usual way. Set the module's environment first
    (``SOFTHSM2_CONF`` is read at initialisation).

    ``login_after``: once it is set (start-up's checks all passed), the
    thread also logs in, lists the token's private-key labels and finds the
    keys named in ``preload`` (the device key): two walks of every token
    object that otherwise follow the imports. The store takes that session
    over instead of logging in itself; a refused login is reported by the
    store as its own and never tried a second time (each try counts against
    the token's PIN retry limit). The store setting the event itself (it
    needs the token now) is the same: it then waits for the thread.
    """
    if not isinstance(config, Pkcs11Config):
        return
    try:
        uri = config.parsed()
        module = config.module_path or uri.module_path
    except Exception:  # the store reports a bad URI
        return
    if not module or module in _prefetching or not os.path.isfile(module):
        return
    early = _Early(uri=uri, go=login_after)

    def load() -> None:
        try:
            import pkcs11

            early.lib = pkcs11.lib(module)
        except Exception:  # the store's own load raises it properly
            _logger.debug("PKCS#11 module prefetch failed", exc_info=True)
            return
        if login_after is None or uri.pin_source is None:
            return
        login_after.wait()
        _early_login(early, module, preload)

    thread = threading.Thread(target=load, name="pkcs11-prefetch", daemon=True)
    _prefetching[module] = thread
    _early[module] = early
    thread.start()


def _early_login(early: _Early, module: str, preload: tuple[str, ...]) -> None:
    import pkcs11.exceptions as p11e

    try:
        assert early.uri.pin_source is not None
        pin = read_secret_file(early.uri.pin_source)
        kwargs: dict[str, str] = {}
        if early.uri.token_label is not None:
            kwargs["token_label"] = early.uri.token_label
        if early.uri.serial is not None:
            kwargs["token_serial"] = early.uri.serial
        token = early.lib.get_token(**kwargs)
    except Exception:  # a PIN file or token problem: the store meets it the usual way
        _logger.debug("PKCS#11 early login skipped", exc_info=True)
        return
    try:
        early.session = token.open(rw=True, user_pin=pin.reveal())
    except p11e.PKCS11Error as exc:
        if _translate(exc).__class__ is KeyStoreAuthError:
            early.login_error = exc
        return
    except Exception:
        _logger.debug("PKCS#11 early login failed", exc_info=True)
        return
    try:
        early.labels = _list_labels(module, early.session)
        for name in preload:
            pair = _pair_by_label(early.session, name)
            if pair is not None:
                early.pairs[name] = pair
    except Exception:  # the store lists and looks up again itself
        _logger.debug("PKCS#11 early lookups failed", exc_info=True)
        early.labels, early.pairs = None, {}


def _await_prefetch(module: str) -> _Early | None:
    """Let a prefetch of ``module`` finish (two C_Initialize calls must never race).

    Returns what it did ahead of the store, once (None after that, or if none).
    """
    thread = _prefetching.get(module)
    early = _early.pop(module, None)
    if early is not None and early.go is not None:
        early.go.set()  # the store needs the token now: log in (if it has not yet)
    if thread is not None:
        thread.join()
    return early


def _translate(exc: BaseException) -> KeyStoreError:
    """Map python-pkcs11 exceptions to the port's errors, keeping the raw name."""
    import pkcs11.exceptions as p11e

    raw = type(exc).__name__
    if isinstance(exc, p11e.PinIncorrect | p11e.PinLocked | p11e.PinExpired | p11e.PinInvalid
                  | p11e.PinLenRange | p11e.UserPinNotInitialized):
        return KeyStoreAuthError("token login failed", backend="pkcs11", raw=raw)
    if isinstance(exc, p11e.TokenNotPresent | p11e.DeviceRemoved | p11e.SessionClosed
                  | p11e.SessionHandleInvalid | p11e.DeviceError | p11e.TokenNotRecognised
                  | p11e.NoSuchToken | p11e.UserNotLoggedIn | p11e.SlotIDInvalid
                  | p11e.DeviceMemory | p11e.GeneralError):
        return KeyStoreUnavailableError("token unavailable", backend="pkcs11", raw=raw)
    if isinstance(exc, p11e.ObjectHandleInvalid | p11e.KeyHandleInvalid):
        # The object was destroyed (e.g. the agent was revoked) under a cached handle.
        return KeyNotFoundError("key no longer in the token", backend="pkcs11", raw=raw)
    return KeyStoreError("token operation failed", backend="pkcs11", raw=raw)


class _Pkcs11Key:
    """A cached (private, public) object pair. Signs through the store's lock."""

    def __init__(self, store: Pkcs11KeyStore, name: str, priv: Any, public: ec.EllipticCurvePublicKey,
                 generation: int, token_obj: Any) -> None:
        self._store = store
        self._name = name
        self._priv = priv  # what signs: the session copy, or the token object itself
        self._token_obj = token_obj  # the key itself, in the token
        self._checked = 0.0  # monotonic time the token object was last seen alive
        self._public = public
        self.generation = generation

    @property
    def name(self) -> str:
        return self._name

    def adopt(self, fresh: _Pkcs11Key) -> None:
        """Take over the objects of the same key loaded in a newer session (lock held)."""
        if fresh is not self:
            self._priv, self._token_obj, self._checked = fresh._priv, fresh._token_obj, 0.0
            self.generation = fresh.generation

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        raw = self.sign_raw(data, signature_algorithm)
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def sign_raw(self, data: bytes, signature_algorithm: ec.ECDSA) -> bytes:
        """r||s as CKM_ECDSA returns it (the JWS form; see port.RawSigner)."""
        _, digest = digest_for(data, signature_algorithm, backend="pkcs11")
        return self._store._sign_digest(self, digest)


class Pkcs11KeyStore:
    """Keys in one PKCS#11 token, behind one lock and one logged-in session."""

    backend = "pkcs11"

    def __init__(self, *, module_path: str, uri: Pkcs11Uri, pin: Secret,
                 session_key_copies: bool = True, command_timeout: float = 3.0) -> None:
        self._module_path = module_path
        self._uri = uri
        self._pin = pin
        self._copies = session_key_copies
        self._lock = threading.RLock()
        self._guard = CallGuard(self._lock, timeout=command_timeout, backend="pkcs11")
        # Why the last call failed for want of the token (None once one succeeds).
        self._down: str | None = None
        self._lib: Any = None
        self._session: Any = None
        self._keys: dict[str, _Pkcs11Key] = {}
        # Bumped on every reconnect so handles from a dead session are never used.
        self._generation = 0
        # Private-key labels the prefetch thread listed in this session, for
        # the first list() (start-up's reconcile); None once used or stale.
        self._early_labels: builtins.list[str] | None = None
        self._early_at = 0.0
        with self._lock:
            self._connect()

    @classmethod
    def from_config(cls, config: Pkcs11Config) -> Pkcs11KeyStore:
        uri = config.parsed()
        module = config.module_path or uri.module_path
        if not module:
            raise ConfigError("no PKCS#11 module: set module_path or module-path in the URI")
        if not os.path.isfile(module):
            raise ConfigError(f"PKCS#11 module not found: {module}")
        if uri.pin_source is None:
            raise ConfigError("the pkcs11 URI needs pin-source=file:/path (mode 0600)")
        return cls(module_path=module, uri=uri, pin=read_secret_file(uri.pin_source),
                   session_key_copies=config.session_key_copies,
                   command_timeout=config.command_timeout)

    # -- session management (call with the lock held) ----------------------------

    def _connect(self) -> None:
        import pkcs11
        import pkcs11.exceptions as p11e

        early = _await_prefetch(self._module_path)
        if early is not None and (early.uri != self._uri or self._lib is not None):
            early = None  # another token's, or not this store's first session
        try:
            if self._lib is None:
                self._lib = (early.lib if early is not None and early.lib is not None
                             else pkcs11.lib(self._module_path))
            else:
                # After a fault, start the module afresh so it rescans slots.
                self._lib.reinitialize()
            if early is not None and early.login_error is not None:
                raise early.login_error  # tried once already: never a second PIN attempt
            if early is not None and early.session is not None:
                self._session = early.session
            else:
                early = None
                kwargs: dict[str, str] = {}
                if self._uri.token_label is not None:
                    kwargs["token_label"] = self._uri.token_label
                if self._uri.serial is not None:
                    kwargs["token_serial"] = self._uri.serial
                token = self._lib.get_token(**kwargs)
                self._session = token.open(rw=True, user_pin=self._pin.reveal())
        except p11e.PKCS11Error as exc:
            self._session = None
            raise _translate(exc) from None
        except RuntimeError as exc:  # library could not be loaded
            self._session = None
            raise KeyStoreUnavailableError(
                "cannot load PKCS#11 module", backend="pkcs11", raw=type(exc).__name__
            ) from None
        self._generation += 1
        self._keys.clear()
        self._early_labels = None
        if early is not None:
            self._take_early(early)
        _logger.info("pkcs11 session open", extra={"token": self._uri.redacted()})

    def _take_early(self, early: _Early) -> None:
        """Use the lookups the prefetch thread made in this very session (lock held).

        The labels answer the first :meth:`list` unless a key was made,
        destroyed or relabelled through this store since (start-up lists
        once, for reconcile); the pairs become cached handles, as a
        :meth:`get` would have made them. Anything odd: looked up afresh.
        """
        import pkcs11.exceptions as p11e

        self._early_labels, self._early_at = early.labels, time.monotonic()
        for name, (priv, pub) in early.pairs.items():
            try:
                self._keep(name, priv, pub)
            except (p11e.PKCS11Error, KeyStoreError):
                self._keys.pop(name, None)

    def _call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(session)`` under the lock, reconnecting once if needed."""
        import pkcs11.exceptions as p11e

        self._guard.acquire("token call")
        try:
            if self._session is None:
                self._connect()
            try:
                result = fn(self._session)
            except p11e.PKCS11Error as exc:
                err = _translate(exc)
                if isinstance(err, KeyStoreUnavailableError):
                    self._drop_session()
                raise err from None
        except KeyStoreUnavailableError as exc:
            self._down = exc.detail
            raise
        finally:
            self._guard.release()
        if self._down is not None:
            self._down = None
        return result

    def problem(self) -> str | None:
        """Why the token cannot sign now, or None; reads state only (health checks)."""
        stuck = self._guard.problem()
        if stuck is not None:
            return f"token not answering: {stuck}"
        down = self._down
        return f"token unavailable: {down}" if down is not None else None

    def _drop_session(self) -> None:
        # Do not call session.close(): it would C_Logout every session, and the
        # session is most likely dead anyway. A reinitialize clears the state.
        self._session = None
        self._keys.clear()
        self._early_labels = None

    # -- the port -------------------------------------------------------------------

    def generate(self, name: str, algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256) -> KeyHandle:
        check_key_name(name)
        if algorithm is not KeyAlgorithm.EC_P256:
            raise KeyStoreError(f"unsupported algorithm {algorithm.value}", backend=self.backend)
        import pkcs11
        from pkcs11.util.ec import encode_named_curve_parameters

        def op(session: Any) -> KeyHandle:
            self._early_labels = None  # the token changes: list it afresh
            if self._find_private(session, name) is not None:
                raise KeyExistsError(f"key {name} exists", backend=self.backend)
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC,
                {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters(_P256_OID)},
                local=True,
            )
            # A random CKA_ID pairs the private and public halves for life,
            # whatever happens to their labels: a destroy or relabel
            # interrupted between the two objects (kill -9) can leave a
            # half under another label, and a later key of the same name
            # must never pair with that debris (see _public_of).
            key_id = secrets.token_bytes(16)
            pub, priv = params.generate_keypair(
                store=True,
                label=name,
                id=key_id,
                capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY,
                public_template={
                    pkcs11.Attribute.TOKEN: True,
                    pkcs11.Attribute.PRIVATE: False,
                },
                private_template={
                    pkcs11.Attribute.TOKEN: True,
                    pkcs11.Attribute.PRIVATE: True,
                    pkcs11.Attribute.SENSITIVE: True,
                    pkcs11.Attribute.EXTRACTABLE: False,
                    pkcs11.Attribute.SIGN: True,
                    pkcs11.Attribute.DERIVE: False,
                    pkcs11.Attribute.DECRYPT: False,
                    pkcs11.Attribute.UNWRAP: False,
                },
            )
            # The pair just made, from the handles C_GenerateKeyPair returned:
            # looking it up again by label walked every token object (issue 22).
            return self._keep(name, priv, pub)

        return self._call(op)

    def get(self, name: str) -> KeyHandle:
        return self._call(lambda session: self._current(session, name))

    def list(self) -> Sequence[str]:
        import pkcs11

        def op(session: Any) -> list[str]:
            early, self._early_labels = self._early_labels, None
            if early is not None and time.monotonic() - self._early_at < EARLY_LIST_S:
                return sorted(early)
            fast = _list_labels(self._module_path, session)
            if fast is not None:
                return sorted(fast)
            objs = session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                                        pkcs11.Attribute.TOKEN: True})
            return sorted(str(o.label) for o in objs)

        return self._call(op)

    def destroy(self, name: str) -> None:
        import pkcs11

        def op(session: Any) -> None:
            self._early_labels = None  # the token changes: list it afresh
            priv = self._find_private(session, name)
            found = priv is not None
            # The public half by pairing id (after an interrupted relabel it
            # may carry another label; a public merely *labelled* ``name``
            # may be another key's).
            pubs = self._public_of(session, priv, name) if priv is not None else []
            # Private first, without a CKA_TOKEN filter: the session copy goes
            # too. Interrupted after it, what is left is a public half that
            # pairs with nothing.
            for obj in list(session.get_objects({
                    pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                    pkcs11.Attribute.LABEL: name})):
                obj.destroy()
            for obj in pubs:
                obj.destroy()
            self._keys.pop(name, None)
            if not found:
                raise KeyNotFoundError(f"key {name} not found", backend=self.backend)

        self._call(op)

    def relabel(self, name: str, new_name: str) -> None:
        """Rename a key pair in the token (quarantine instead of destroying it).

        CKA_LABEL is modifiable on token objects; the session copy, if any,
        is destroyed so nothing signs under the old name afterwards.
        """
        check_key_name(new_name)
        import pkcs11

        def op(session: Any) -> None:
            self._early_labels = None  # the token changes: list it afresh
            if self._find_private(session, new_name) is not None:
                raise KeyExistsError(f"key {new_name} exists", backend=self.backend)
            if self._find_private(session, name) is None:
                raise KeyNotFoundError(f"key {name} not found", backend=self.backend)
            priv = self._find_private(session, name)
            pubs = self._public_of(session, priv, name)
            # Private half first: interrupted here, the public half keeps the
            # old label but still pairs with it by CKA_ID.
            for obj in list(session.get_objects({
                    pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                    pkcs11.Attribute.LABEL: name})):
                if obj[pkcs11.Attribute.TOKEN]:
                    obj[pkcs11.Attribute.LABEL] = new_name
                else:
                    obj.destroy()  # the session copy
            for obj in pubs:
                obj[pkcs11.Attribute.LABEL] = new_name
            self._keys.pop(name, None)

        self._call(op)

    def properties(self, name: str) -> KeyProperties:
        import pkcs11

        def op(session: Any) -> KeyProperties:
            priv = self._find_private(session, name)
            if priv is None:
                raise KeyNotFoundError(f"key {name} not found", backend=self.backend)
            attr = pkcs11.Attribute
            return KeyProperties(
                backend=self.backend,
                sensitive=bool(priv[attr.SENSITIVE]),
                extractable=bool(priv[attr.EXTRACTABLE]),
                never_extractable=bool(priv[attr.NEVER_EXTRACTABLE]),
                local=bool(priv[attr.LOCAL]),
                extra={"token": self._uri.redacted()},
            )

        return self._call(op)

    def ping(self) -> None:
        def op(session: Any) -> None:
            # C_GetSessionInfo is the cheapest call that proves the session lives.
            _ = session.token.label
            session.generate_random(64)

        self._call(op)

    def close(self) -> None:
        if not self._lock.acquire(timeout=self._guard.timeout):
            _logger.warning("token busy at close; leaving its session behind")
            return
        try:
            if self._session is not None:
                try:
                    self._session.close()
                except Exception:
                    _logger.debug("pkcs11 session close failed", exc_info=True)
            self._session = None
            self._keys.clear()
        finally:
            self._lock.release()

    # -- sealing (SecretSealer) ---------------------------------------------------

    def seal(self, key_name: str, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM in the token under ``key_name`` (made on first use)."""
        check_key_name(key_name)
        import pkcs11

        def op(session: Any) -> bytes:
            key = self._secret_key(session, key_name, create=True)
            nonce = secrets.token_bytes(12)
            sealed = key.encrypt(plaintext, mechanism=pkcs11.Mechanism.AES_GCM,
                                 mechanism_param=pkcs11.GCMParams(nonce, aad, 128))
            return nonce + bytes(sealed)

        return self._call(op)

    def unseal(self, key_name: str, blob: bytes, aad: bytes) -> bytes:
        check_key_name(key_name)
        if len(blob) < 12 + 16:
            raise KeyStoreError("sealed blob too short", backend=self.backend)
        import pkcs11

        def op(session: Any) -> bytes:
            key = self._secret_key(session, key_name, create=False)
            return bytes(key.decrypt(blob[12:], mechanism=pkcs11.Mechanism.AES_GCM,
                                     mechanism_param=pkcs11.GCMParams(blob[:12], aad, 128)))

        return self._call(op)

    def _secret_key(self, session: Any, name: str, *, create: bool) -> Any:
        import pkcs11

        objs = list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                                         pkcs11.Attribute.LABEL: name,
                                         pkcs11.Attribute.TOKEN: True}))
        if len(objs) > 1:
            raise KeyStoreError(f"several secret keys labelled {name}", backend=self.backend)
        if objs:
            return objs[0]
        if not create:
            raise KeyNotFoundError(f"sealing key {name} not found", backend=self.backend)
        return session.generate_key(
            pkcs11.KeyType.AES, 256, label=name, store=True,
            capabilities=pkcs11.MechanismFlag.ENCRYPT | pkcs11.MechanismFlag.DECRYPT,
            template={pkcs11.Attribute.TOKEN: True, pkcs11.Attribute.PRIVATE: True,
                      pkcs11.Attribute.SENSITIVE: True, pkcs11.Attribute.EXTRACTABLE: False,
                      pkcs11.Attribute.WRAP: False, pkcs11.Attribute.UNWRAP: False})

    # -- helpers (lock held) -------------------------------------------------------

    def _find_private(self, session: Any, name: str) -> Any | None:
        import pkcs11

        objs = list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                                         pkcs11.Attribute.LABEL: name,
                                         pkcs11.Attribute.TOKEN: True}))
        if len(objs) > 1:
            raise KeyStoreError(f"several keys labelled {name}", backend=self.backend)
        return objs[0] if objs else None

    def _load(self, session: Any, name: str) -> _Pkcs11Key:
        pair = self._pair_by_label(session, name)
        if pair is not None:
            priv, pubs = pair[0], [pair[1]]
        else:
            priv = self._find_private(session, name)
            if priv is None:
                raise KeyNotFoundError(f"key {name} not found", backend=self.backend)
            pubs = self._public_of(session, priv, name)
        if len(pubs) != 1:
            raise KeyStoreError(f"public half of {name} missing", backend=self.backend)
        return self._keep(name, priv, pubs[0])

    def _keep(self, name: str, priv: Any, pub: Any) -> _Pkcs11Key:
        """Cache the handle of the pair (``priv``, ``pub``) as ``name`` (lock held)."""
        from pkcs11.util.ec import encode_ec_public_key

        public = serialization.load_der_public_key(encode_ec_public_key(pub))
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise KeyStoreError(f"key {name} is not an EC key", backend=self.backend)
        key = _Pkcs11Key(self, name, self._session_copy(priv, name), public, self._generation,
                         token_obj=priv)
        self._keys[name] = key
        return key

    def _pair_by_label(self, session: Any, name: str) -> tuple[Any, Any] | None:
        return _pair_by_label(session, name)

    def _public_of(self, session: Any, priv: Any, name: str) -> builtins.list[Any]:
        """The public half of ``priv``: paired by CKA_ID, else (old tokens) by label.

        Pairing by id survives a relabel or destroy interrupted between the
        two objects; the label is the fallback when the id is shared
        (keys made before ids were random, whose id was derived from the name).
        """
        import pkcs11

        pub_cls = {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PUBLIC_KEY,
                   pkcs11.Attribute.TOKEN: True}
        try:
            key_id = bytes(priv[pkcs11.Attribute.ID])
        except Exception:  # no CKA_ID on a foreign key
            key_id = b""
        if key_id:
            by_id = list(session.get_objects({**pub_cls, pkcs11.Attribute.ID: key_id}))
            if len(by_id) == 1:
                return by_id
        return list(session.get_objects({**pub_cls, pkcs11.Attribute.LABEL: name}))

    def _current(self, session: Any, name: str) -> _Pkcs11Key:
        """The cached key of this session, loading it if needed (lock held).

        Every lookup goes through here under the lock, so a key is loaded,
        and copied, once per session.
        """
        cached = self._keys.get(name)
        if cached is not None and cached.generation == self._generation:
            return cached
        return self._load(session, name)

    def _session_copy(self, priv: Any, name: str) -> Any:
        """A session object copy of ``priv`` to sign with, or ``priv`` itself.

        The copy is made inside the token (``C_CopyObject``), so the key
        never leaves it, and is used only if the token reports it sensitive
        and unextractable. It lives as long as this session: a reconnect
        (the token went away) loses it, :meth:`destroy` (revocation,
        rotation) destroys it with the key, and every signature first checks,
        at most every ``LIVENESS_S``, that the token object still exists, so
        a key deleted behind badged's back, or SoftHSM's store vanishing,
        stops signing within that time (tests/contract/test_pkcs11_attributes.py).
        A token that refuses the copy keeps signing with the token object.
        """
        if not self._copies:
            return priv
        import pkcs11
        import pkcs11.exceptions as p11e

        try:
            copy = priv.copy({pkcs11.Attribute.TOKEN: False})
        except p11e.PKCS11Error as exc:
            _logger.info("token refused a session copy; signing with the token object",
                         extra={"key": name, "raw": type(exc).__name__})
            return priv
        attr = pkcs11.Attribute
        if not (copy[attr.SENSITIVE] and not copy[attr.EXTRACTABLE] and not copy[attr.TOKEN]):
            copy.destroy()
            _logger.warning("session copy of a key was not sensitive; not used",
                            extra={"key": name})
            return priv
        return copy

    def _sign_digest(self, key: _Pkcs11Key, digest: bytes) -> bytes:
        import pkcs11
        import pkcs11.exceptions as p11e

        def op(session: Any) -> bytes:
            if key.generation != self._generation:
                # The session was re-opened since this handle was cached.
                key.adopt(self._current(session, key.name))
            priv = key._priv
            try:
                if priv is not key._token_obj:
                    now = time.monotonic()
                    if now - key._checked >= LIVENESS_S:
                        # The copy would sign on after the token object is
                        # gone; reading an attribute of the token object makes
                        # the token check it exists (raises as below if not).
                        _ = key._token_obj[pkcs11.Attribute.SIGN]
                        key._checked = now
                return bytes(priv.sign(digest, mechanism=pkcs11.Mechanism.ECDSA))
            except (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid):
                # The cached handle died: the key was destroyed, or the token's
                # object store went away and came back (SoftHSM then sees the
                # objects only after C_Initialize). Start the module afresh and
                # look the key up once: a returning token recovers without a
                # daemon restart, a destroyed key is KeyNotFoundError.
                self._drop_session()
                self._connect()
                key.adopt(self._current(self._session, key.name))
                return bytes(key._priv.sign(digest, mechanism=pkcs11.Mechanism.ECDSA))

        return self._call(op)


def _pair_by_label(session: Any, name: str) -> tuple[Any, Any] | None:
    """Both halves of ``name`` from one search, when that settles it; else None.

    Each search walks every object of the token (SoftHSM re-reads each
    object's file), and the general path makes two (the private half by
    label, then the public half by CKA_ID): with 1,000 agents, ~0.3 s
    each (issue 22). One search by label suffices when it finds exactly
    one private and one public token object whose CKA_ID is the same
    random id: a random id pairs only these two (an id derived from the
    name, as old keys have, may be shared, so it takes the general path,
    as does anything else unusual).
    """
    import hashlib

    import pkcs11

    attr = pkcs11.Attribute
    privs, pubs = [], []
    for obj in session.get_objects({attr.LABEL: name, attr.TOKEN: True}):
        if obj.object_class == pkcs11.ObjectClass.PRIVATE_KEY:
            privs.append(obj)
        elif obj.object_class == pkcs11.ObjectClass.PUBLIC_KEY:
            pubs.append(obj)
    if len(privs) != 1 or len(pubs) != 1:
        return None
    try:
        ids = bytes(privs[0][attr.ID]), bytes(pubs[0][attr.ID])
    except Exception:  # no CKA_ID on a foreign key
        return None
    if not ids[0] or ids[0] != ids[1] or ids[0] == hashlib.sha256(name.encode()).digest()[:16]:
        return None
    return privs[0], pubs[0]


# -- listing labels without python-pkcs11's object wrappers (issue 22) -----------
#
# python-pkcs11 wraps every object a search finds: it reads ten attributes to
# pick the object's Python class and builds that class, then reads the label
# with two more calls. With 1,000 agents (3,000 keys) that was ~1 s of the
# daemon's start (reconcile lists the token once). The same search through
# the module's own C entry points reads one attribute per object. It runs on
# the store's session under the store's lock, like every other call; any
# surprise (a module without these exports, a return code other than OK, a
# label that does not fit or is not UTF-8) returns None and the caller lists
# through python-pkcs11, which raises the usual errors.

_CKA_CLASS, _CKA_TOKEN, _CKA_LABEL = 0, 1, 3
_CKO_PRIVATE_KEY = 3
_LABEL_MAX = 256
_native: dict[str, Any] = {}


def _native_module(module_path: str) -> Any | None:
    """The PKCS#11 module already loaded by python-pkcs11, with typed entry points."""
    if module_path in _native:
        return _native[module_path]
    import ctypes

    try:
        lib = ctypes.CDLL(module_path)
        for fn in ("C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal",
                   "C_GetAttributeValue"):
            getattr(lib, fn).restype = ctypes.c_ulong
    except (OSError, AttributeError):
        lib = None
    _native[module_path] = lib
    return lib


def _list_labels(module_path: str, session: Any) -> builtins.list[str] | None:
    """Labels of the token's private keys, one attribute read per key; None to fall back."""
    import ctypes

    lib = _native_module(module_path)
    handle = getattr(session, "handle", None)
    if lib is None or not isinstance(handle, int):
        return None
    ulong = ctypes.c_ulong

    class Attribute(ctypes.Structure):
        _fields_ = [("type", ulong), ("pValue", ctypes.c_void_p), ("ulValueLen", ulong)]

    klass, token = ulong(_CKO_PRIVATE_KEY), ctypes.c_ubyte(1)
    template = (Attribute * 2)(
        Attribute(_CKA_CLASS, ctypes.cast(ctypes.byref(klass), ctypes.c_void_p),
                  ctypes.sizeof(klass)),
        Attribute(_CKA_TOKEN, ctypes.cast(ctypes.byref(token), ctypes.c_void_p), 1))
    sh = ulong(handle)
    if lib.C_FindObjectsInit(sh, template, 2) != 0:
        return None
    found: builtins.list[int] = []
    batch, count = (ulong * 512)(), ulong()
    try:
        while True:
            if lib.C_FindObjects(sh, batch, 512, ctypes.byref(count)) != 0:
                return None
            if count.value == 0:
                break
            found.extend(batch[:count.value])
    finally:
        lib.C_FindObjectsFinal(sh)
    buf = ctypes.create_string_buffer(_LABEL_MAX)
    attr = Attribute(_CKA_LABEL, ctypes.cast(buf, ctypes.c_void_p), _LABEL_MAX)
    labels: builtins.list[str] = []
    for obj in found:
        attr.ulValueLen = _LABEL_MAX
        if lib.C_GetAttributeValue(sh, ulong(obj), ctypes.byref(attr), 1) != 0:
            return None
        if attr.ulValueLen > _LABEL_MAX:
            return None
        try:
            labels.append(buf.raw[:attr.ulValueLen].decode("utf-8"))
        except UnicodeDecodeError:
            return None
    return labels
