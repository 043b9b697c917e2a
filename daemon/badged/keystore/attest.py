"""Key attestation: an *optional* capability of a key store.

A backend that can prove where a key lives implements :class:`KeyAttester`;
callers test for it with ``isinstance(store, KeyAttester)`` (it is
``runtime_checkable``) instead of asking for a backend by name.

The TPM backend answers with ``format == "tpm2-certify"``: a TPM2_Certify of
the agent key by an attestation key (AK), over a fresh nonce chosen by the
verifier. What that proves, and what it does not, is in docs/tpm.md; the
checks are in :mod:`badged.core.tpm_evidence`, which needs no TPM.

Everything here is plain bytes so the evidence can be shipped to a relying
party as is (e.g. base64 in a JSON/CBOR envelope) and checked there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

FORMAT_TPM2_CERTIFY = "tpm2-certify"


@dataclass(frozen=True)
class KeyAttestation:
    """Evidence that ``key_name``'s key was generated in, and cannot leave, a TPM.

    ``attest``: the TPMS_ATTEST structure exactly as the TPM signed it.
    ``signature``: the AK's ECDSA signature over ``attest`` (DER, SHA-256).
    ``ak_public``: the AK's TPMT_PUBLIC (marshaled), whose Name a verifier
    pins after credential activation against the EK.
    ``key_public``: the certified key's TPMT_PUBLIC (marshaled); its Name is
    what ``attest`` certifies, and it carries the object attributes.
    ``ek_certificate``: DER EK certificate from the TPM's NV, if provisioned.
    """

    format: str
    key_name: str
    nonce: bytes
    attest: bytes
    signature: bytes
    ak_public: bytes
    key_public: bytes
    ek_certificate: bytes | None = None


@runtime_checkable
class KeyAttester(Protocol):
    """A key store that can produce :class:`KeyAttestation` for its keys."""

    def attest(self, name: str, nonce: bytes) -> KeyAttestation:
        """Certify key ``name`` with the verifier's fresh ``nonce`` (8..64 bytes).

        Raises KeyNotFoundError, KeyStoreUnavailableError like other store calls.
        """
        ...
