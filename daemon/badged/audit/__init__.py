"""Tamper-evident, crash-safe audit log (placeholder; see log.py)."""
