"""The one error hierarchy: every error knows its HTTP status and gRPC status code.

Transports never decide a status themselves; they read it from the error. A client
mistake is a 4xx whose message names the field and what was expected. A 5xx other
than the explicit availability errors (overload, model not ready) means a bug.
"""

from __future__ import annotations

import math


class BastionError(Exception):
    """Base of every error Bastion reports to a client."""

    http_status: int = 500
    grpc_code: str = "INTERNAL"  # name of a grpc.StatusCode member; core must not import grpc

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    @property
    def retry_after_s(self) -> int | None:
        """``retry_after`` as every transport states it (HTTP ``Retry-After``, gRPC
        ``retry-after`` metadata): whole seconds, rounded up, at least 1, since "retry after
        0 s" invites the immediate retry the error is asking the client not to make."""
        if self.retry_after is None:
            return None
        return max(1, math.ceil(self.retry_after))


class InvalidInput(BastionError):
    """The request is malformed or does not match the model's signature."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class Unauthenticated(BastionError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(BastionError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class NotFound(BastionError):
    """Unknown model, version or route."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class MethodNotAllowed(BastionError):
    http_status = 405
    grpc_code = "UNIMPLEMENTED"

    def __init__(self, message: str, *, allow: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allow = allow  # the methods the resource takes: HTTP's Allow header


class PayloadTooLarge(BastionError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class UnsupportedMediaType(BastionError):
    http_status = 415
    grpc_code = "INVALID_ARGUMENT"


class Unprocessable(BastionError):
    """Well-formed but cannot be served as asked (e.g. no zoo variant meets the targets)."""

    http_status = 422
    grpc_code = "FAILED_PRECONDITION"


class RateLimited(BastionError):
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class ModelNotReady(BastionError):
    """The model exists but is not loaded (loading, unloaded or failed to load)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class Overloaded(BastionError):
    """The model's bounded queue is full: reject at once instead of building a backlog."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class ServiceUnavailable(BastionError):
    """A store the request's admission depends on (the limits shared by the replicas) is
    unreachable, and the operator chose to refuse rather than serve unlimited."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class RequestTimeout(BastionError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class InternalError(BastionError):
    http_status = 500
    grpc_code = "INTERNAL"
