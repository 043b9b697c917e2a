"""The one error hierarchy of the daemon.

Every failure that can reach a caller is a :class:`BadgedError` subclass with a
fixed :class:`ErrorCode` and a fixed ``public_message``. The caller only ever
sees that public message; the ``detail`` goes to the log and the audit record.
Nothing here imports grpc: the single mapping to gRPC status codes lives in
``badged.service.errors`` so the core can be used (and tested) without it.

Rule for authors: never put a PIN, key material or a credential in ``detail``
either -- logs are read by more people than the token is.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorCode(enum.Enum):
    """Stable, machine-readable reason, sent to callers in a trailer."""

    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    UNAUTHENTICATED = "unauthenticated"
    ATTESTATION_FAILED = "attestation_failed"
    POLICY_DENIED = "policy_denied"
    RATE_LIMITED = "rate_limited"
    FAILED_PRECONDITION = "failed_precondition"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_FAILURE = "backend_failure"
    CONFIG_INVALID = "config_invalid"
    INTERNAL = "internal"


class BadgedError(Exception):
    """Base of every domain error.

    ``detail`` is for operators (log, audit); ``public_message`` is for callers.
    ``raw`` keeps a vendor code (``CKR_PIN_INCORRECT``, a TSS2 rc) for diagnosis.
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    public_message: ClassVar[str] = "internal error"

    def __init__(self, detail: str = "", *, raw: str | None = None,
                 public: str | None = None) -> None:
        super().__init__(detail or self.public_message)
        self.detail = detail or self.public_message
        self.raw = raw
        # A more specific caller-facing reason, only ever a fixed phrase or
        # the caller's own (validated) input: never a secret, never detail.
        self.public = public

    @property
    def caller_message(self) -> str:
        return self.public or self.public_message

    def __str__(self) -> str:
        if self.raw:
            return f"{self.detail} [{self.raw}]"
        return self.detail


class InvalidRequestError(BadgedError):
    code = ErrorCode.INVALID_REQUEST
    public_message = "invalid request"


class NotFoundError(BadgedError):
    code = ErrorCode.NOT_FOUND
    public_message = "not found"


class AlreadyExistsError(BadgedError):
    code = ErrorCode.ALREADY_EXISTS
    public_message = "already exists"


class UnauthenticatedError(BadgedError):
    """The connection carries no kernel-attested identity (e.g. a direct dial)."""

    code = ErrorCode.UNAUTHENTICATED
    public_message = "caller identity unknown"


class AttestationError(BadgedError):
    """Attestation failed: the caller's process (exited, pid reused, unreadable),
    or key evidence that does not check out (stale nonce, wrong key, bad AK)."""

    code = ErrorCode.ATTESTATION_FAILED
    public_message = "caller attestation failed"


class PolicyDeniedError(BadgedError):
    code = ErrorCode.POLICY_DENIED
    public_message = "denied by policy"


class RateLimitedError(BadgedError):
    code = ErrorCode.RATE_LIMITED
    public_message = "rate limit exceeded"

    def __init__(self, detail: str = "", *, retry_after: float = 0.0) -> None:
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(detail, public=f"rate budget exhausted; retry after {seconds}s")
        self.retry_after = seconds


class FailedPreconditionError(BadgedError):
    code = ErrorCode.FAILED_PRECONDITION
    public_message = "operation not allowed in the current state"


class ConfigError(BadgedError):
    """A config or policy file is wrong; carries file and line for the operator."""

    code = ErrorCode.CONFIG_INVALID
    public_message = "invalid configuration"

    def __init__(self, detail: str, *, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + detail)
        self.path = path
        self.line = line


class StateError(BadgedError):
    """A state file (agent registry) could not be saved: the change did not happen.

    The operator is told plainly that nothing changed, so retrying is safe.
    """

    code = ErrorCode.BACKEND_UNAVAILABLE
    public_message = "state could not be saved; nothing changed"


# -- key store errors: part of the key-store port's contract -------------------


class KeyStoreError(BadgedError):
    """Token/TPM failure that is not the caller's fault and not transient."""

    code = ErrorCode.BACKEND_FAILURE
    public_message = "key store failure"

    def __init__(self, detail: str = "", *, backend: str = "", raw: str | None = None) -> None:
        super().__init__(detail, raw=raw)
        self.backend = backend


class KeyStoreUnavailableError(KeyStoreError):
    """Token removed, session lost, TPM gone: fail closed, retry later."""

    code = ErrorCode.BACKEND_UNAVAILABLE
    public_message = "key store unavailable"


class KeyStoreAuthError(KeyStoreError):
    """Wrong PIN / auth value, or token locked. Never retried automatically."""

    code = ErrorCode.BACKEND_UNAVAILABLE
    public_message = "key store unavailable"


class KeyNotFoundError(KeyStoreError):
    code = ErrorCode.NOT_FOUND
    public_message = "key not found"


class KeyExistsError(KeyStoreError):
    code = ErrorCode.ALREADY_EXISTS
    public_message = "key already exists"


class AuditError(BadgedError):
    """The audit record could not be made durable: nothing is issued."""

    code = ErrorCode.BACKEND_UNAVAILABLE
    public_message = "audit log unavailable"


def all_error_classes() -> list[type[BadgedError]]:
    """Every concrete error class, for the test that proves each one is mapped."""
    seen: list[type[BadgedError]] = []
    stack: list[type[BadgedError]] = [BadgedError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen
