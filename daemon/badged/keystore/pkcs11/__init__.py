"""PKCS#11 backend (python-pkcs11). Imported lazily: clients never need it."""
