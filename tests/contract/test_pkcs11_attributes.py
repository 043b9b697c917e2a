"""PKCS#11-specific: the private key cannot be read out of the token."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.softhsm


def test_private_key_attributes_and_unreadable(pkcs11_store: object, softhsm_token: object) -> None:
    import pkcs11
    import pkcs11.exceptions as p11e

    from badged.keystore.pkcs11.store import Pkcs11KeyStore

    assert isinstance(pkcs11_store, Pkcs11KeyStore)
    name = "attr-check/tok/1"
    pkcs11_store.generate(name)
    props = pkcs11_store.properties(name)
    assert props.sensitive and not props.extractable and props.never_extractable and props.local

    # Read through the store's own session (a second login would fail):
    # CKA_VALUE of a sensitive key must be refused by the token itself.
    session = pkcs11_store._session
    objs = list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                                     pkcs11.Attribute.LABEL: name}))
    # The token object, and the session copy the store signs with: both unreadable.
    assert sorted(bool(o[pkcs11.Attribute.TOKEN]) for o in objs) == [False, True]
    for obj in objs:
        assert obj[pkcs11.Attribute.SENSITIVE] and not obj[pkcs11.Attribute.EXTRACTABLE]
        with pytest.raises(p11e.AttributeSensitive):
            _ = obj[pkcs11.Attribute.VALUE]
    priv = next(o for o in objs if o[pkcs11.Attribute.TOKEN])
    with pytest.raises((p11e.KeyUnextractable, p11e.MechanismInvalid, p11e.KeyNotWrappable,
                        p11e.FunctionNotSupported, p11e.ArgumentsBad, p11e.KeyHandleInvalid,
                        p11e.WrappingKeyHandleInvalid, TypeError, NotImplementedError)):
        # Wrapping with any key must be refused for a non-extractable key.
        secret = session.generate_key(pkcs11.KeyType.AES, 256, store=False,
                                      capabilities=pkcs11.MechanismFlag.WRAP)
        secret.wrap_key(priv)
    pkcs11_store.destroy(name)


def test_raw_signature_is_r_and_s_and_tokens_verify(pkcs11_store: object) -> None:
    """The r||s path tokens use on PKCS#11 (no DER round trip) signs correctly."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from joserfc import jwt
    from joserfc.jwk import ECKey

    from badged.core.jose import ec_public_jwk, jwk_thumbprint
    from badged.core.tokens import ES256, build_claims, mint_token
    from badged.keystore.pkcs11.store import Pkcs11KeyStore, _Pkcs11Key

    assert isinstance(pkcs11_store, Pkcs11KeyStore)
    key = pkcs11_store.generate("raw-check/tok/1")
    assert isinstance(key, _Pkcs11Key)  # sign_raw is the PKCS#11 key's own (JOSE r||s)
    raw = key.sign_raw(b"message", ES256)
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.public_key().verify(der, b"message", ES256)
    jwk = ec_public_jwk(key.public_key())
    claims = build_claims(issuer="i", subject="s", audience="aud", scopes=("read",),
                          ttl_seconds=60, now=1_000, jti="j")
    issued = mint_token(claims=claims, key=key, key_id=jwk_thumbprint(jwk))
    assert jwt.decode(issued.token, ECKey.import_key({**jwk}), algorithms=["ES256"]).claims["jti"] == "j"
    pkcs11_store.destroy("raw-check/tok/1")


def test_session_copies_do_not_outlive_their_key(pkcs11_store: object) -> None:
    """Revocation through the store destroys the copy; a token object removed
    behind the store's back stops the copy signing within LIVENESS_S."""
    import time

    import pkcs11

    from badged.core.tokens import ES256
    from badged.errors import KeyNotFoundError
    from badged.keystore.pkcs11.store import LIVENESS_S, Pkcs11KeyStore

    assert isinstance(pkcs11_store, Pkcs11KeyStore)

    def objects(label: str) -> list[Any]:
        # The store's current session: a reconnect replaces it.
        return list(pkcs11_store._session.get_objects(
            {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
             pkcs11.Attribute.LABEL: label}))

    a = pkcs11_store.generate("copy-check/a")
    a.sign(b"m", ES256)
    assert len(objects("copy-check/a")) == 2  # token object + session copy
    assert pkcs11_store.list().count("copy-check/a") == 1  # copies are not keys
    pkcs11_store.destroy("copy-check/a")
    assert objects("copy-check/a") == []
    with pytest.raises(KeyNotFoundError):
        a.sign(b"m", ES256)

    b = pkcs11_store.generate("copy-check/b")
    b.sign(b"m", ES256)
    token_obj = next(o for o in objects("copy-check/b") if o[pkcs11.Attribute.TOKEN])
    token_obj.destroy()  # as another tool deleting the key from the token would
    time.sleep(LIVENESS_S * 1.5)
    with pytest.raises(KeyNotFoundError):
        b.sign(b"m", ES256)
    assert objects("copy-check/b") == []  # the reconnect dropped the copy too


def test_session_copies_can_be_turned_off(softhsm_token: object, pkcs11_store: object) -> None:
    import pkcs11

    from badged.core.tokens import ES256
    from badged.keystore.pkcs11.store import Pkcs11KeyStore

    assert isinstance(pkcs11_store, Pkcs11KeyStore)
    pkcs11_store._copies = False  # as session_key_copies = false in the config
    try:
        key = pkcs11_store.generate("copy-check/off")
        key.public_key().verify(key.sign(b"m", ES256), b"m", ES256)
        objs = list(pkcs11_store._session.get_objects(
            {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
             pkcs11.Attribute.LABEL: "copy-check/off"}))
        assert [bool(o[pkcs11.Attribute.TOKEN]) for o in objs] == [True]
        pkcs11_store.destroy("copy-check/off")
    finally:
        pkcs11_store._copies = True
