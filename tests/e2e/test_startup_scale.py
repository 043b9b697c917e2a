"""Start-up with a large policy (issue 22): one parse, the module loaded meanwhile, a short log.

A policy shared between hosts can name thousands of users this host does not
have. Start-up still warns about them (usually a typo), but logs at most
``MAX_WARNINGS_LOGGED`` lines and says how many more there are; the daemon
runs the very policy the check parsed.
"""

from __future__ import annotations

from pathlib import Path

from badged.__main__ import MAX_WARNINGS_LOGGED
from tests.e2e.conftest import start_daemon


def test_thousands_of_absent_users_log_a_bounded_summary(fresh_state: Path) -> None:
    d = start_daemon(fresh_state)
    d.stop()
    policy = fresh_state / "policy.toml"
    absent = 3_900_000
    extra = "".join(f'\n[[agent]]\nname = "ghost-{i}"\nselectors = ["unix:uid:{absent + i}"]\n'
                    'bundles = ["demo"]\n' for i in range(MAX_WARNINGS_LOGGED + 15))
    policy.write_text(policy.read_text() + extra)
    before = d.log_text()
    d = start_daemon(fresh_state)
    try:
        log = d.log_text()[len(before):]
        warned = [line for line in log.splitlines() if "no user with this uid" in line]
        assert len(warned) == MAX_WARNINGS_LOGGED
        assert "and 15 more warnings" in log
    finally:
        d.stop()
