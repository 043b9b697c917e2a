"""Typed errors raised by the client, mapped from the daemon's gRPC status.

The daemon sends a stable code in the ``x-badged-error`` trailer; without it
(e.g. a gRPC-level failure such as an oversized message) we fall back to the
status code.
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


class RateLimitedError(BadgeError):
    """Budget exhausted; ``retry_after`` seconds (from the daemon) if known."""

    retry_after: int | None = None


class FailedPreconditionError(BadgeError):
    pass


class UnavailableError(BadgeError):
    """Daemon not running, socket missing, or token/TPM unavailable: retry later."""


class InternalError(BadgeError):
    pass


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
    cls = _BY_STATUS.get(status, InternalError)
    exc = cls(details, status=status.name if status else "", code=meta.get("x-badged-error", ""))
    if isinstance(exc, RateLimitedError) and meta.get("x-badged-retry-after", "").isdigit():
        exc.retry_after = int(meta["x-badged-retry-after"])
    return exc
