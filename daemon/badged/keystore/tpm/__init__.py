"""TPM 2.0 backend (tpm2-pytss / ESAPI). Imported lazily: clients never need it."""
