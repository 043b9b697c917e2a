"""Fixtures of tests/tpm: the swtpm ones live in tests/tpm_fixtures.py.

They are imported here unless the root conftest already registered that module
as a plugin (``pytest_plugins``), so the session-wide provisioning runs once.
"""

from __future__ import annotations

import sys

if "tests.tpm_fixtures" not in sys.modules:  # pragma: no branch
    from tests.tpm_fixtures import swtpm_instance, swtpm_provisioned, tpm_store  # noqa: F401
