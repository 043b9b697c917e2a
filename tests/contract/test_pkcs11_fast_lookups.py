"""The PKCS#11 store's faster start-up lookups (issue 22) answer exactly as the general ones.

Real SoftHSM. ``list()`` reads labels through the module's C entry points
instead of python-pkcs11's object wrappers; loading a key pairs its halves
from one search by label when a random CKA_ID settles it. Both must agree
with the general path, including for keys whose halves were left apart (an
interrupted relabel) or that carry an old name-derived id.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from badged.errors import KeyNotFoundError
from badged.keystore.pkcs11 import store as p11store

pytestmark = pytest.mark.softhsm


def _slow_list(store: Any) -> list[str]:
    def op(session: Any) -> list[str]:
        objs = session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                                    pkcs11.Attribute.TOKEN: True})
        return sorted(str(o.label) for o in objs)

    return list(store._call(op))


def test_list_reads_the_same_labels_as_python_pkcs11(pkcs11_store: Any) -> None:
    prefix = f"fl-{uuid.uuid4().hex[:8]}"
    for i in range(5):
        pkcs11_store.generate(f"{prefix}-{i}")
    pkcs11_store.relabel(f"{prefix}-0", f"{prefix}-moved")
    pkcs11_store.destroy(f"{prefix}-1")
    fast = list(pkcs11_store.list())
    assert fast == _slow_list(pkcs11_store)
    assert f"{prefix}-moved" in fast and f"{prefix}-1" not in fast
    # the fast path was the one that answered
    assert pkcs11_store._call(
        lambda s: p11store._list_labels(pkcs11_store._module_path, s)) is not None


def _fresh_load(store: Any, name: str) -> Any:
    store._keys.pop(name, None)
    return store.get(name)


def test_one_search_pairs_a_key_and_falls_back_when_the_halves_differ(pkcs11_store: Any) -> None:
    name = f"pair-{uuid.uuid4().hex[:8]}"
    made = pkcs11_store.generate(name)
    assert pkcs11_store._call(lambda s: pkcs11_store._pair_by_label(s, name)) is not None
    assert _fresh_load(pkcs11_store, name).public_key() == made.public_key()

    # An interrupted relabel: the public half keeps another label. One search
    # by label finds no pair; the general path still pairs by CKA_ID.
    def move_public(session: Any) -> None:
        for obj in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PUBLIC_KEY,
                                        pkcs11.Attribute.LABEL: name}):
            obj[pkcs11.Attribute.LABEL] = name + "-half"

    pkcs11_store._call(move_public)
    assert pkcs11_store._call(lambda s: pkcs11_store._pair_by_label(s, name)) is None
    assert _fresh_load(pkcs11_store, name).public_key() == made.public_key()


def test_a_name_derived_id_takes_the_general_path(pkcs11_store: Any) -> None:
    name = f"old-{uuid.uuid4().hex[:8]}"
    made = pkcs11_store.generate(name)
    old_id = hashlib.sha256(name.encode()).digest()[:16]

    def set_old_id(session: Any) -> None:
        for obj in session.get_objects({pkcs11.Attribute.LABEL: name,
                                        pkcs11.Attribute.TOKEN: True}):
            obj[pkcs11.Attribute.ID] = old_id

    pkcs11_store._call(set_old_id)
    assert pkcs11_store._call(lambda s: pkcs11_store._pair_by_label(s, name)) is None
    assert _fresh_load(pkcs11_store, name).public_key() == made.public_key()
    pkcs11_store.destroy(name)
    with pytest.raises(KeyNotFoundError):
        _fresh_load(pkcs11_store, name)


def test_generate_searches_once_and_keeps_the_pair_it_made(
        pkcs11_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new key's handle comes from C_GenerateKeyPair, not from a search by label.

    Every search walks each object of a file-backed token: generate() made
    two (the existence check and the load of the pair just made), and
    creating an agent three keys at a time slowed with every agent (issue 22).
    """
    searches: list[str] = []
    for helper in ("_find_private", "_pair_by_label", "_public_of"):
        real = getattr(pkcs11_store, helper)

        def counted(*args: Any, _real: Any = real, _name: str = helper) -> Any:
            searches.append(_name)
            return _real(*args)

        monkeypatch.setattr(pkcs11_store, helper, counted)
    name = f"gen-{uuid.uuid4().hex[:8]}"
    made = pkcs11_store.generate(name)
    assert searches == ["_find_private"]  # the existence check only
    monkeypatch.undo()
    data = b"signed by the pair just made"
    sig = made.sign(data, ec.ECDSA(hashes.SHA256()))
    fresh = _fresh_load(pkcs11_store, name)  # the general lookup finds the same pair
    assert fresh.public_key() == made.public_key()
    fresh.public_key().verify(sig, data, ec.ECDSA(hashes.SHA256()))
    assert pkcs11_store.properties(name).sensitive
    pkcs11_store.destroy(name)
