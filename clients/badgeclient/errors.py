"""Typed errors raised by the client, chosen by the daemon's stable code.

The daemon sends a stable code in the ``x-badged-error`` trailer
(``daemon/badged/service/errors.py``); the error class is chosen from it, so
``policy_denied`` and ``attestation_failed`` -- both PERMISSION_DENIED on the
wire -- are different types. Without a known code (a gRPC-level failure such
as an oversized message, or a code from a newer daemon) we fall back to the
status.
"""

from __future__ import annotations

import grpc


class BadgeError(Exception):
    """Base class. ``status`` is the gRPC status name, ``code`` the daemon's code."""

    def __init__(self, message: str, *, status: str = "", code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class InvalidRequestError(BadgeError):
    pass


class NotFoundError(BadgeError):
    pass


class AlreadyExistsError(BadgeError):
    pass


class UnauthenticatedError(BadgeError):
    pass


class PermissionDeniedError(BadgeError):
    pass


class PolicyDeniedError(PermissionDeniedError):
    """The policy does not allow this caller this credential (code ``policy_denied``)."""


class AttestationFailedError(PermissionDeniedError):
    """The daemon could not establish who the caller is (code ``attestation_failed``)."""


class RateLimitedError(BadgeError):
    """Budget exhausted; ``retry_after`` seconds (from the daemon) if known."""

    retry_after: int | None = None


class FailedPreconditionError(BadgeError):
    pass


class UnavailableError(BadgeError):
    """Daemon not running, socket missing, or token/TPM unavailable: retry later."""


class BackendUnavailableError(UnavailableError):
    """The key store (token, TPM) is unavailable right now (code ``backend_unavailable``)."""


class InternalError(BadgeError):
    pass


#: The daemon's ``ErrorCode`` values (badged/errors.py) -> the class raised.
BY_CODE: dict[str, type[BadgeError]] = {
    "invalid_request": InvalidRequestError,
    "not_found": NotFoundError,
    "already_exists": AlreadyExistsError,
    "unauthenticated": UnauthenticatedError,
    "attestation_failed": AttestationFailedError,
    "policy_denied": PolicyDeniedError,
    "rate_limited": RateLimitedError,
    "failed_precondition": FailedPreconditionError,
    "backend_unavailable": BackendUnavailableError,
    "backend_failure": InternalError,
    "config_invalid": FailedPreconditionError,
    "internal": InternalError,
}


_BY_STATUS: dict[grpc.StatusCode, type[BadgeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    # The daemon shutting down cancels calls it had not started: retryable.
    grpc.StatusCode.CANCELLED: UnavailableError,
}


def from_rpc_error(err: grpc.RpcError) -> BadgeError:
    status = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(status)
    meta: dict[str, str] = {}
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for item in trailers or ():
        key, value = item.key, item.value  # grpc.Metadatum namedtuple
        meta[key] = value if isinstance(value, str) else bytes(value).decode()
    code = meta.get("x-badged-error", "")
    cls = BY_CODE.get(code) or _BY_STATUS.get(status, InternalError)
    exc = cls(details, status=status.name if status else "", code=code)
    if isinstance(exc, RateLimitedError) and meta.get("x-badged-retry-after", "").isdigit():
        exc.retry_after = int(meta["x-badged-retry-after"])
    return exc
