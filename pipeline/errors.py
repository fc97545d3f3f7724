"""Errors that end a request, each tied to the gRPC status code a client sees."""

from __future__ import annotations

import grpc


class DvDError(Exception):
    """Base of request-ending errors; `code` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(DvDError):
    """The client sent something unusable (bad image, bad parameter)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(DvDError):
    """A queue or limit is full; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(DvDError):
    """A dependency (a vision server) cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(DvDError):
    """The request ran out of time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(DvDError):
    """Missing or wrong API key."""

    code = grpc.StatusCode.UNAUTHENTICATED


class InternalError(DvDError):
    """A fault inside the server; the message is safe to show."""

    code = grpc.StatusCode.INTERNAL
