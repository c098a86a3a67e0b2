"""Typed errors with stable codes. The gRPC adapter maps them to status codes in one place.

    PdpError
    ├── InvalidArgument      malformed input; names the field; nothing was recorded
    ├── Unauthenticated      missing, unknown or revoked token
    ├── NotFound             no such proposal for this agent
    ├── AlreadyExists        idempotency key reused for a different action
    ├── PermissionDenied     authenticated, but not allowed to do this (an approver outside the groups)
    ├── FailedPrecondition   the proposal is not in a state that allows this
    ├── ResourceExhausted    the caller holds too many of a bounded resource (open watch streams, failed logins)
    └── Unavailable          the database failed; nothing was decided
A deny is an answer, never an error.
"""

from __future__ import annotations


class PdpError(Exception):
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(PdpError):
    code = "invalid_argument"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Unauthenticated(PdpError):
    code = "unauthenticated"


class NotFound(PdpError):
    code = "not_found"


class AlreadyExists(PdpError):
    code = "already_exists"


class PermissionDenied(PdpError):
    code = "permission_denied"


class FailedPrecondition(PdpError):
    code = "failed_precondition"


class ResourceExhausted(PdpError):
    code = "resource_exhausted"

    def __init__(self, message: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds, when a retry later may succeed (0: not said)


class Unavailable(PdpError):
    code = "unavailable"
