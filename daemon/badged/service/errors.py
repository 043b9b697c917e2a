"""The one boundary where domain errors become gRPC status codes.

``STATUS_FOR`` is total over :class:`~badged.errors.ErrorCode` (a unit test
iterates the enum), so no error can fall through to ``UNKNOWN``. The caller
gets the fixed public message plus an ``x-badged-error`` trailer with the
stable code; the detail goes to the log only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

import grpc

from badged.errors import BadgedError, ErrorCode

_logger = logging.getLogger(__name__)

ERROR_TRAILER = "x-badged-error"
RETRY_TRAILER = "x-badged-retry-after"

STATUS_FOR: Final[Mapping[ErrorCode, grpc.StatusCode]] = {
    ErrorCode.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.ATTESTATION_FAILED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.POLICY_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.BACKEND_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.BACKEND_FAILURE: grpc.StatusCode.INTERNAL,
    ErrorCode.CONFIG_INVALID: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

if TYPE_CHECKING:
    Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Ctx = Any
    Handler = Any

Behavior = Callable[[Any, Ctx], Awaitable[Any]]

_AUDITED_HERE = frozenset({ErrorCode.UNAUTHENTICATED, ErrorCode.ATTESTATION_FAILED,
                           ErrorCode.INVALID_REQUEST})


class AuditSink(Protocol):
    async def append(self, event: Mapping[str, Any]) -> object: ...


class ErrorBoundary(grpc.aio.ServerInterceptor):
    """Wraps every unary handler: BadgedError → status; anything else → INTERNAL."""

    def __init__(self, *, log_details: bool = True, audit: AuditSink | None = None) -> None:
        self._log_details = log_details
        # Refusals that happen before the policy gate (no identity, caller
        # gone, malformed request) are audited here; the gate audits its own.
        self._audit = audit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        wrapped = self._wrap(method, handler.unary_unary)  # type: ignore[arg-type]
        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def wrapped(request: Any, context: Ctx) -> Any:
            try:
                return await behavior(request, context)
            except BadgedError as exc:
                status = STATUS_FOR[exc.code]
                extra = {"method": method, "code": exc.code.value, "status": status.name}
                if self._log_details:
                    extra["detail"] = str(exc)
                _logger.info("request refused", extra=extra)
                trailers: list[tuple[str, str]] = [(ERROR_TRAILER, exc.code.value)]
                retry_after = getattr(exc, "retry_after", None)
                if retry_after:
                    trailers.append((RETRY_TRAILER, str(retry_after)))
                context.set_trailing_metadata(tuple(trailers))
                if self._audit is not None and exc.code in _AUDITED_HERE:
                    await self._audit.append({"event": "request.refused", "method": method,
                                              "decision": "deny", "code": exc.code.value,
                                              "reason": str(exc)[:300],
                                              "peer": context.peer()[:120]})
                await context.abort(status, exc.caller_message)
            except grpc.aio.AbortError:
                raise
            except Exception:
                _logger.exception("unhandled error", extra={"method": method})
                context.set_trailing_metadata(((ERROR_TRAILER, ErrorCode.INTERNAL.value),))
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return wrapped
