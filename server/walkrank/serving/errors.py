"""Request-level errors, each carrying the gRPC status code the interceptor maps it to."""

from __future__ import annotations

from walkrank.errors import WalkRankError


class RequestError(WalkRankError):
    """A request the server refuses; `code` names a `grpc.StatusCode` member."""

    code = "INVALID_ARGUMENT"


class InvalidArgument(RequestError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class TenantNotFound(RequestError):
    code = "NOT_FOUND"


class QuotaExceeded(RequestError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(RequestError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(RequestError):
    code = "UNAUTHENTICATED"


class PermissionDenied(RequestError):
    code = "PERMISSION_DENIED"
