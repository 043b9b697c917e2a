"""The client chooses its error type from the daemon's stable code, and keeps
its own type through ``with``.

The codes travel the real way: a gRPC server on a Unix socket answers with the
daemon's ``ErrorBoundary`` (the one table of status and trailer), and the
real daemon refuses a request its policy does not allow.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from badgeclient import WorkloadClient
from badgeclient.errors import (
    BY_CODE,
    AttestationFailedError,
    BackendUnavailableError,
    BadgeError,
    InternalError,
    PermissionDeniedError,
    PolicyDeniedError,
    UnavailableError,
)
from badged.errors import ErrorCode
from badged_proto.v1 import workload_pb2, workload_pb2_grpc
from tests.conftest import ROOT
from tests.e2e.conftest import RunningDaemon, daemon, softhsm_available

__all__ = ["daemon", "softhsm_available"]


def test_every_daemon_code_has_a_client_type() -> None:
    assert {c.value for c in ErrorCode} == set(BY_CODE)


class Refuser(workload_pb2_grpc.WorkloadServiceServicer):
    """Answers FetchToken with the status and trailer named in the audience."""

    def FetchToken(self, request: workload_pb2.FetchTokenRequest,
                   context: grpc.ServicerContext) -> workload_pb2.FetchTokenResponse:
        status, _, code = request.audience.partition("/")
        if code:
            context.set_trailing_metadata((("x-badged-error", code),))
        context.abort(grpc.StatusCode[status], "refused")
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def refuser() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bce", dir="/tmp"))
    sock = d / "s"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    # Only FetchToken is answered; the other methods stay UNIMPLEMENTED.
    workload_pb2_grpc.add_WorkloadServiceServicer_to_server(Refuser(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    yield sock
    server.stop(None)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(("status", "code", "cls"), [
    ("PERMISSION_DENIED", "policy_denied", PolicyDeniedError),
    ("PERMISSION_DENIED", "attestation_failed", AttestationFailedError),
    ("UNAVAILABLE", "backend_unavailable", BackendUnavailableError),
    ("FAILED_PRECONDITION", "config_invalid", BY_CODE["config_invalid"]),
    # The code wins over the status; an unknown code falls back to the status.
    ("INTERNAL", "policy_denied", PolicyDeniedError),
    ("PERMISSION_DENIED", "from_a_newer_daemon", PermissionDeniedError),
    ("UNAVAILABLE", "", UnavailableError),
    ("DATA_LOSS", "", InternalError),
])
def test_error_type_from_the_trailer(refuser: Path, status: str, code: str,
                                     cls: type[BadgeError]) -> None:
    with WorkloadClient(refuser, timeout=5) as c, pytest.raises(BadgeError) as info:
        c.fetch_token(audience=f"{status}/{code}")
    assert type(info.value) is cls
    assert info.value.code == code
    assert info.value.status == status


@pytest.mark.softhsm
@pytest.mark.slow
def test_real_daemon_refusal_is_a_policy_denial(daemon: RunningDaemon) -> None:
    with WorkloadClient(daemon.workload) as c, pytest.raises(PolicyDeniedError) as info:
        c.fetch_token(audience="https://not-in-policy.example.com")
    assert info.value.code == "policy_denied"


@pytest.mark.slow
def test_with_keeps_the_client_type(tmp_path: Path) -> None:
    """``with WorkloadClient() as c`` is a WorkloadClient to a type checker, not Any."""
    user = tmp_path / "user_code.py"
    user.write_text(textwrap.dedent("""
        from badgeclient import AdminClient, WorkloadClient

        with WorkloadClient("/run/x.sock") as c:
            reveal_type(c)
            c.fetch_tokn(audience="x")
        with AdminClient("/run/y.sock") as a:
            reveal_type(a)
        """))
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                        "--cache-dir", str(tmp_path / "cache"), str(user)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert 'Revealed type is "badgeclient.client.WorkloadClient"' in r.stdout, r.stdout
    assert 'Revealed type is "badgeclient.client.AdminClient"' in r.stdout, r.stdout
    assert 'has no attribute "fetch_tokn"' in r.stdout, r.stdout
