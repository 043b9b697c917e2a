"""Start-up's early login (issue 22): the prefetch thread logs in, lists and finds the device key.

With 1,000 agents the token's list and the device key's lookup are two walks
of 6,000 objects; the thread that already runs ``C_Initialize`` does them
while the daemon imports itself, once start-up's checks passed. The store
takes that session over. What must hold, in a real SoftHSM token, each case
in its own process (one login per process):

* the store answers exactly as without it (same labels, same device key),
  and logs in once (the PIN is used once, by the thread);
* the early list is used once, and never after the store changed the token;
* a refused PIN is tried once: the store reports the thread's refusal
  instead of trying again (each try counts against the retry limit).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, short_tmpdir

pytestmark = pytest.mark.softhsm
CHILD = Path(__file__).with_name("early_login_child.py")


@pytest.fixture
def token_dir() -> Iterator[Path]:
    if shutil.which("softhsm2-util") is None:
        pytest.skip("softhsm2-util not installed")
    base = short_tmpdir("bel")
    yield base / "hsm"
    shutil.rmtree(base, ignore_errors=True)


def _child(mode: str, directory: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "daemon"), str(ROOT)]))
    env.pop("SOFTHSM2_CONF", None)
    proc = subprocess.run([sys.executable, str(CHILD), mode, str(directory)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_the_store_takes_over_the_early_session_and_lookups(token_dir: Path) -> None:
    made = _child("setup", token_dir)
    seen = _child("early", token_dir)
    assert seen["labels"] == made["labels"] == seen["labels_again"]
    assert seen["device_kid_ok"] is True
    assert seen["pin_reveals"] == 1  # one login, by the thread
    # The list and the device key's search ran on the prefetch thread; the
    # store's first list() walked nothing, its second walked again.
    assert seen["walks_before"] == ["list:pkcs11-prefetch", "pair:pkcs11-prefetch",
                                    "pair:MainThread"]  # the test's own general lookup
    assert seen["walks"] == seen["walks_before"] + ["list:MainThread"]


def test_a_change_through_the_store_discards_the_early_list(token_dir: Path) -> None:
    _child("setup", token_dir)
    seen = _child("early-then-change", token_dir)
    assert "badged/agent/b/v1/tok" in seen["labels"]
    assert seen["walks"].count("list:MainThread") == 2  # both lists walked the token


def test_a_refused_pin_is_tried_once(token_dir: Path) -> None:
    _child("setup", token_dir)
    seen = _child("wrong-pin", token_dir)
    assert seen["error"] == "KeyStoreAuthError"
    assert seen["pin_reveals"] == 1  # the thread's try; the store did not try again
