"""Errors that end a request, each tied to the gRPC status code and the HTTP status a client sees."""

from __future__ import annotations

import grpc


class DvDError(Exception):
    """Base of request-ending errors; `code` is the gRPC status, `http_status` the HTTP API's."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, where one is known (HTTP API errors name it)


class InvalidRequest(DvDError):
    """The client sent something unusable (bad image, bad parameter)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class PayloadTooLarge(InvalidRequest):
    """An image, video or request body is over its size limit."""

    http_status = 413


class ModelNotFound(DvDError):
    """The request names a model this server does not serve."""

    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class ResourceExhausted(DvDError):
    """A queue or limit is full; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class Unavailable(DvDError):
    """A dependency (a vision server) cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExceeded(DvDError):
    """The request ran out of time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Unauthenticated(DvDError):
    """Missing or wrong API key."""

    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class InternalError(DvDError):
    """A fault inside the server; the message is safe to show."""

    code = grpc.StatusCode.INTERNAL


MAX_MESSAGE_CHARS = 300  # a status message longer than this would echo the request back (and can break HTTP/2 limits)


def short_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` cut to at most `limit` characters (ending in "...") for a gRPC status or an HTTP error."""
    return message if len(message) <= limit else message[: limit - 3] + "..."
