"""Client library for badged: agents fetch credentials, operators manage identities."""

from badgeclient.client import (
    AdminClient,
    AgentInfo,
    AgentMatch,
    Signature,
    Token,
    WhoAmI,
    WorkloadClient,
)
from badgeclient.errors import (
    AlreadyExistsError,
    BadgeError,
    FailedPreconditionError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AdminClient", "AgentInfo", "AgentMatch", "AlreadyExistsError", "BadgeError",
    "FailedPreconditionError", "InternalError", "InvalidRequestError", "NotFoundError",
    "PermissionDeniedError", "RateLimitedError", "Signature", "Token", "UnauthenticatedError",
    "UnavailableError", "WhoAmI", "WorkloadClient",
]
