"""PKCS#11-specific: the private key cannot be read out of the token."""

from __future__ import annotations

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
    priv = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=name)
    with pytest.raises(p11e.AttributeSensitive):
        _ = priv[pkcs11.Attribute.VALUE]
    with pytest.raises((p11e.KeyUnextractable, p11e.MechanismInvalid, p11e.KeyNotWrappable,
                        p11e.FunctionNotSupported, p11e.ArgumentsBad, p11e.KeyHandleInvalid,
                        p11e.WrappingKeyHandleInvalid, TypeError, NotImplementedError)):
        # Wrapping with any key must be refused for a non-extractable key.
        secret = session.generate_key(pkcs11.KeyType.AES, 256, store=False,
                                      capabilities=pkcs11.MechanismFlag.WRAP)
        secret.wrap_key(priv)
    pkcs11_store.destroy(name)
