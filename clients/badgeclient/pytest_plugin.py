"""A pytest plugin that runs a real ``badged dev`` for a downstream project's tests.

Installing badgeclient enables it (a ``pytest11`` entry point; ``-p
no:badgeclient.pytest_plugin`` turns it off), then::

    def test_my_agent(badged_dev):
        tok = badged_dev.client.fetch_token(audience="https://api.example.com", scopes=["read"])

``badged_dev`` pre-writes ``DIR/policy.toml`` (the ``badged_policy`` fixture:
a dict, TOML text, a path, or ``None`` for the dev default), starts ``badged
dev --state-dir DIR --agent NAME`` on a throwaway SoftHSM token, waits for its
``badged ready`` line, yields a :class:`BadgedDev` (sockets, a ready
:class:`~badgeclient.WorkloadClient`, the environment for child processes),
then stops it with SIGTERM and removes DIR. Override ``badged_policy`` or
``badged_agent`` in your conftest to change them. The same machinery is
available outside pytest as :func:`start_badged_dev`.

It needs the daemon (``pip install badged``) and SoftHSM (``softhsm2``) where
the tests run; docs/agent-kit.md has the CI recipe.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeAlias

import pytest

from badgeclient.client import AdminClient, WorkloadClient
from badgeclient.tokensource import TokenSource

TomlValue: TypeAlias = "str | int | float | bool | Sequence[TomlValue] | Mapping[str, TomlValue]"
PolicySpec: TypeAlias = "Mapping[str, TomlValue] | str | os.PathLike[str]"

DEFAULT_AGENT = "ci-agent"
START_TIMEOUT = 90.0  # SoftHSM key generation on a loaded CI runner
STOP_TIMEOUT = 20.0
READY = re.compile(rb"badged ready workload=(\S+) admin=(\S+)")


# -- policy as TOML ---------------------------------------------------------------------


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _scalar(v: TomlValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, Sequence) and not any(isinstance(x, Mapping) for x in v):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as a TOML value here")


def _is_table_list(v: TomlValue) -> bool:
    return (isinstance(v, Sequence) and not isinstance(v, str) and bool(v)
            and all(isinstance(x, Mapping) for x in v))


def _table(path: list[str], doc: Mapping[str, TomlValue], out: list[str]) -> None:
    for k, v in doc.items():
        if not isinstance(v, Mapping) and not _is_table_list(v):
            out.append(f"{_key(k)} = {_scalar(v)}")
    for k, v in doc.items():
        sub = [*path, _key(k)]
        if isinstance(v, Mapping):
            out.append(f"\n[{'.'.join(sub)}]")
            _table(sub, v, out)
        elif _is_table_list(v):
            assert isinstance(v, Sequence)
            for item in v:
                assert isinstance(item, Mapping)
                out.append(f"\n[[{'.'.join(sub)}]]")
                _table(sub, item, out)


def policy_toml(policy: Mapping[str, TomlValue]) -> str:
    """A policy given as a dict, as the TOML ``badged`` reads (checked by reading it back)."""
    out: list[str] = ["# Written by badgeclient.pytest_plugin."]
    _table([], policy, out)
    text = "\n".join(out) + "\n"
    if tomllib.loads(text) != json.loads(json.dumps(policy)):
        raise ValueError("policy does not round-trip through TOML (use TOML text instead)")
    return text


def simple_policy(agent: str, *, audiences: Sequence[str], scopes: Sequence[str] = (),
                  kinds: Sequence[str] = ("token",), max_ttl: str = "1h",
                  uid: int | None = None) -> dict[str, TomlValue]:
    """One bundle bound to ``agent``, and ``agent`` bound to this uid (the test process)."""
    return {
        "bundle": {"ci": {"audiences": list(audiences), "scopes": list(scopes),
                          "kinds": list(kinds), "max_ttl": max_ttl}},
        "agent": [{"name": agent, "selectors": [f"unix:uid:{os.getuid() if uid is None else uid}"],
                   "bundles": ["ci"]}],
    }


# -- the running daemon -----------------------------------------------------------------


class BadgedDev:
    """A running ``badged dev``: where its sockets are, and clients for them."""

    def __init__(self, state_dir: Path, agent: str, proc: subprocess.Popen[bytes], log: Path,
                 workload: Path, admin: Path) -> None:
        self.state_dir = state_dir
        self.agent = agent
        self.proc = proc
        self.log_path = log
        self.workload_socket = workload
        self.admin_socket = admin
        self.policy_path = state_dir / "policy.toml"
        self.client = WorkloadClient(workload)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def admin(self) -> AdminClient:
        """A client for the admin socket (the caller closes it)."""
        return AdminClient(self.admin_socket)

    def token_source(self, **kwargs: object) -> TokenSource:
        """A :class:`TokenSource` on this daemon's socket (the caller closes it)."""
        return TokenSource(self.workload_socket, **kwargs)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """The environment for a child process (an agent under test) to find this daemon."""
        return dict(os.environ, BADGED_SOCKET=str(self.workload_socket),
                    BADGED_ADMIN_SOCKET=str(self.admin_socket))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL if it has not exited in ``timeout`` seconds."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __repr__(self) -> str:
        return f"BadgedDev(pid={self.pid}, workload={str(self.workload_socket)!r})"


def _drain(stream: IO[bytes], log: Path) -> None:
    """Keep the daemon's stdout flowing after the ready line (a full pipe would stall it)."""
    with open(log, "ab") as fh:
        for chunk in iter(lambda: stream.read1(4096), b""):  # type: ignore[attr-defined]
            fh.write(chunk)
            fh.flush()


def _write_policy(path: Path, policy: PolicySpec) -> None:
    if isinstance(policy, Mapping):
        text = policy_toml(policy)
    elif isinstance(policy, str) and "\n" in policy:
        text = policy
    else:
        text = Path(policy).read_text()
    path.write_text(text)


@contextmanager
def start_badged_dev(*, policy: PolicySpec | None = None, agent: str = DEFAULT_AGENT,
                     command: Sequence[str] | None = None, extra_args: Sequence[str] = (),
                     timeout: float = START_TIMEOUT, keep: bool = False) -> Iterator[BadgedDev]:
    """Run ``badged dev`` in a fresh state dir for the duration of the ``with`` block.

    ``policy``: a dict, TOML text, or a file; ``None`` keeps the dev default
    (``agent`` bound to this uid, audiences ``https://api.example.com`` and
    friends). ``command`` replaces ``[sys.executable, "-m", "badged"]``.
    ``keep`` leaves the state dir (and its log) for a post-mortem.
    """
    # Short and private: Unix socket paths are limited to 108 bytes, which a
    # pytest tmp_path can exceed.
    state = Path(tempfile.mkdtemp(prefix="badged-ci-", dir="/tmp"))
    os.chmod(state, 0o755)  # noqa: S103 -- like /run: an agent under test may run as another uid
    log = state / "badged.log"
    if policy is not None:
        _write_policy(state / "policy.toml", policy)
    argv = [*(command or (sys.executable, "-m", "badged")), "dev", "--state-dir", str(state),
            "--agent", agent, *extra_args]
    dev: BadgedDev | None = None
    try:
        with open(log, "ab") as log_fh:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_fh,
                                    stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        match = None
        while match is None and time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                buf += chunk
                match = READY.search(buf)
        if match is None:
            exited = proc.poll()
            proc.kill()
            proc.wait()
            tail = log.read_text(errors="replace")[-4000:]
            why = (f"exited with status {exited}" if exited is not None
                   else f"was not ready in {timeout:.0f} s")
            raise RuntimeError(f"badged dev did not become ready: it {why}; "
                               f"stdout {buf[-500:]!r}; log:\n{tail}")
        threading.Thread(target=_drain, args=(proc.stdout, log), daemon=True,
                         name="badged-dev-stdout").start()
        dev = BadgedDev(state, agent, proc, log, Path(match.group(1).decode()),
                        Path(match.group(2).decode()))
        yield dev
    finally:
        if dev is not None:
            dev.stop()
        if not keep:
            shutil.rmtree(state, ignore_errors=True)


# -- fixtures ---------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("badged_agent", "agent name for the badged_dev fixture", default=DEFAULT_AGENT)
    parser.addini("badged_start_timeout", "seconds to wait for badged dev to be ready",
                  default=str(START_TIMEOUT))
    parser.addini("badged_skip_without_softhsm",
                  "skip (instead of fail) tests using badged_dev where SoftHSM is missing",
                  type="bool", default=False)


@pytest.fixture
def badged_policy() -> PolicySpec | None:
    """The policy ``badged_dev`` runs with; override it (dict, TOML text or path)."""
    return None


@pytest.fixture
def badged_agent(request: pytest.FixtureRequest) -> str:
    """The agent ``badged dev`` creates; the ``badged_agent`` ini option by default."""
    return _ini(request.config, "badged_agent", DEFAULT_AGENT)


def _ini(config: pytest.Config, name: str, default: str) -> str:
    """An ini value; the default when the plugin's options are not registered
    (fixtures imported into a conftest instead of loading the plugin)."""
    try:
        return str(config.getini(name))
    except ValueError:
        return default


def _start(request: pytest.FixtureRequest, policy: PolicySpec | None,
           agent: str) -> Iterator[BadgedDev]:
    if shutil.which("softhsm2-util") is None:
        # A CI job that silently skips its identity tests proves nothing:
        # failing is the default, skipping an explicit choice.
        reason = "badged_dev needs SoftHSM (softhsm2-util not found; apt-get install softhsm2)"
        if _ini(request.config, "badged_skip_without_softhsm", "False") == "True":
            pytest.skip(reason)
        pytest.fail(reason)
    timeout = float(_ini(request.config, "badged_start_timeout", str(START_TIMEOUT)))
    with start_badged_dev(policy=policy, agent=agent, timeout=timeout) as dev:
        yield dev


@pytest.fixture
def badged_dev(request: pytest.FixtureRequest, badged_policy: PolicySpec | None,
               badged_agent: str) -> Iterator[BadgedDev]:
    """A real ``badged dev`` on a throwaway SoftHSM token, stopped after the test."""
    yield from _start(request, badged_policy, badged_agent)


@pytest.fixture(scope="session")
def badged_session_policy() -> PolicySpec | None:
    """The policy of ``badged_dev_session``; override it at session scope."""
    return None


@pytest.fixture(scope="session")
def badged_dev_session(request: pytest.FixtureRequest,
                       badged_session_policy: PolicySpec | None) -> Iterator[BadgedDev]:
    """One ``badged dev`` for the whole run (start-up costs seconds: key generation),
    for tests that do not change its state; the agent is the ``badged_agent`` ini value."""
    yield from _start(request, badged_session_policy,
                      _ini(request.config, "badged_agent", DEFAULT_AGENT))
