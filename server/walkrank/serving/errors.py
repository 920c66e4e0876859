"""Request-level errors, each carrying the gRPC status code the interceptor maps it to."""

from __future__ import annotations

from walkrank.errors import WalkRankError

#: How much of a client's value an error message quotes: enough to recognise it, never so
#: much that a hostile value (a 1 MB tenant name) is sent back in the status trailer.
QUOTE_CHARS = 64


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`repr` of a client value cut to `limit` characters (then '…'), for error messages."""
    text = value if isinstance(value, str) else str(value)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "…"


class RequestError(WalkRankError):
    """A request the server refuses; `code` names a `grpc.StatusCode` member, `reason` is
    the label the client-error metric counts it under."""

    code = "INVALID_ARGUMENT"
    reason = "invalid_argument"


class InvalidArgument(RequestError):
    def __init__(self, field: str, problem: str, reason: str = "invalid_argument") -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.reason = reason


class TenantNotFound(RequestError):
    code = "NOT_FOUND"
    reason = "unknown_tenant"


class QuotaExceeded(RequestError):
    code = "RESOURCE_EXHAUSTED"
    reason = "quota"


class DeadlineExceeded(RequestError):
    code = "DEADLINE_EXCEEDED"
    reason = "deadline"


class Unauthenticated(RequestError):
    code = "UNAUTHENTICATED"
    reason = "unauthenticated"


class PermissionDenied(RequestError):
    code = "PERMISSION_DENIED"
    reason = "permission_denied"
