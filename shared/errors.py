"""The error taxonomy: every expected failure in Shoal is a `ShoalError`.

Each error has a `code` (what went wrong, independent of transport), says
whether retrying elsewhere may help (`retryable`), and carries structured
`fields` (for example `worker_id`, `retry_after_s`) for logs and clients.
The code is mapped to a gRPC status once (shared/rpc/errors.py) and to an HTTP
status once (shared/httpapi.py); nothing else translates errors.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class ShoalError(Exception):
    """Base of the taxonomy. Subclasses fix `code` and `retryable`."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields: dict[str, Any] = fields

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, {self.fields!r})"


class InvalidArgument(ShoalError):
    """The request is malformed or out of range; retrying it unchanged fails again."""

    code = ErrorCode.INVALID_ARGUMENT


class NotFound(ShoalError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(ShoalError):
    code = ErrorCode.ALREADY_EXISTS


class Unauthenticated(ShoalError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(ShoalError):
    code = ErrorCode.PERMISSION_DENIED


class FailedPrecondition(ShoalError):
    """The system is not in a state that allows the operation (e.g. a migration runs)."""

    code = ErrorCode.FAILED_PRECONDITION


class Overloaded(ShoalError):
    """Capacity is exhausted for now; `retry_after_s` says when to try again."""

    code = ErrorCode.RESOURCE_EXHAUSTED
    retryable = True

    def __init__(self, message: str, retry_after_s: float = 1.0, **fields: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **fields)
        self.retry_after_s = retry_after_s


class Unavailable(ShoalError):
    """A dependency (worker, store, Redis) cannot be reached; another may serve."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(ShoalError):
    code = ErrorCode.DEADLINE_EXCEEDED
    retryable = True


class Cancelled(ShoalError):
    code = ErrorCode.CANCELLED


class Internal(ShoalError):
    """A bug or an unexpected state; the message must still say what happened."""

    code = ErrorCode.INTERNAL


ERROR_TYPES: dict[ErrorCode, type[ShoalError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Unauthenticated,
        PermissionDenied,
        FailedPrecondition,
        Overloaded,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}


def error_for(code: ErrorCode, message: str, **fields: Any) -> ShoalError:
    """Rebuild the taxonomy error for `code` (used when decoding a remote error)."""
    return ERROR_TYPES[code](message, **fields)
