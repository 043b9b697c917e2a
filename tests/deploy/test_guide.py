"""docs/deploy.md steps 3-5 run verbatim: the commands a new operator copies,
with only the prefix of /etc, /var/lib and /run moved under a temporary root,
the test's system user standing in for ``badged``, and ``sudo`` dropped (the
test runs as root; ``sudo -u badged`` becomes ``setpriv`` to that user)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, short_tmpdir
from tests.deploy.layout import SystemUser, user_env, user_python

pytestmark = pytest.mark.slow
GUIDE = ROOT / "docs" / "deploy.md"


def guide_blocks(*sections: str) -> str:
    """The ```bash blocks of the numbered sections, in order."""
    text = GUIDE.read_text()
    out: list[str] = []
    for number in sections:
        m = re.search(rf"^## {number}\. .*?(?=^## )", text, re.M | re.S)
        assert m, f"section {number} not in {GUIDE}"
        out += re.findall(r"^```bash\n(.*?)^```", m.group(0), re.M | re.S)
    return "\n".join(out)


@pytest.fixture
def scratch_root(svc_user: SystemUser) -> Iterator[Path]:
    """Step 2's result (tmpfiles.d) under a temporary root, and the operator group."""
    if shutil.which("setpriv") is None or shutil.which("openssl") is None:
        pytest.skip("needs setpriv and openssl")
    root = short_tmpdir("bdg")
    os.chmod(root, 0o755)
    u = svc_user
    for rel, owner, group, mode in (("etc/badged", 0, u.gid, 0o750), ("run/badged", u.uid, u.gid, 0o755),
                                    ("var/lib/badged", u.uid, u.gid, 0o750),
                                    ("var/lib/badged/softhsm", u.uid, u.gid, 0o700),
                                    ("var/lib/badged/softhsm/tokens", u.uid, u.gid, 0o700)):
        (root / rel).mkdir(parents=True)
        os.chown(root / rel, owner, group)
        os.chmod(root / rel, mode)
    ops = f"{u.name}-op"
    subprocess.run(["groupadd", "--system", ops], check=True)
    subprocess.run(["usermod", "-aG", ops, u.name], check=True)  # sysusers.d: m badged badged-operators
    try:
        yield root
    finally:
        subprocess.run(["gpasswd", "-d", u.name, ops], check=False, capture_output=True)
        subprocess.run(["groupdel", ops], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_guide_steps_3_to_5_verbatim(svc_user: SystemUser, scratch_root: Path) -> None:
    u, root = svc_user, scratch_root
    script = guide_blocks("3", "4", "5")
    for prefix in ("/etc/badged", "/var/lib/badged", "/run/badged"):
        script = script.replace(prefix, f"{root}{prefix}")
    script = script.replace("sudo -u badged ", f"setpriv --reuid={u.uid} --regid={u.gid} --init-groups ")
    script = re.sub(r"\bsudo ", "", script)
    script = script.replace("/opt/badged/bin/badged", f"{user_python()} -m badged")
    script = script.replace("badged-operators", f"{u.name}-op")
    script = script.replace("root:badged", f"root:{u.name}").replace("-o badged -g badged",
                                                                      f"-o {u.name} -g {u.name}")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, timeout=300, env=user_env(), cwd=root, check=False)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- script ---\n{script}"
    assert "pkcs11:token=badged: login OK" in proc.stdout
    assert proc.stdout.count("badged.toml: OK") == 2
    pin = root / "etc" / "badged" / "user.pin"
    st = os.stat(pin)
    assert (st.st_uid, st.st_mode & 0o777) == (u.uid, 0o600)
