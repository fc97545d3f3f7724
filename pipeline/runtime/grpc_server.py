"""gRPC plumbing shared by the servers: the error interceptor, API keys, health, reflection."""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pipeline.errors import DvDError, short_message
from proto.dvd.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Undecodable:
    """What a guarded request deserializer returns for bytes that are not a valid request."""

    message: str


def tolerant_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an Undecodable instead of raising (gRPC would answer UNKNOWN)."""
    if deserializer is None:
        return None
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "request message"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError) as exc:
            return Undecodable(short_message(f"request is not a valid {name}: {exc}"))

    return deserialize


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a handler into status codes: DvDError -> its code, others -> INTERNAL;
    a request that does not decode -> INVALID_ARGUMENT. Every message is cut to MAX_MESSAGE_CHARS."""

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method),
                request_deserializer=tolerant_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            behavior = handler.unary_stream
            guard = _guard_stream if inspect.isasyncgenfunction(behavior) else _guard_unary
            return grpc.unary_stream_rpc_method_handler(
                guard(behavior, method),
                request_deserializer=tolerant_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


class DecodeErrorInterceptor(grpc.ServerInterceptor):
    """For synchronous servers (the vision server's): a request that does not decode -> INVALID_ARGUMENT."""

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.unary_stream_rpc_method_handler
        behavior = handler.unary_unary or handler.unary_stream

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return behavior(request, context)

        return make(
            guarded,
            request_deserializer=tolerant_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without "authorization: Bearer <key>" (health and reflection stay open)."""

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}"

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(_OPEN_METHODS):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if metadata.get("authorization") == self._expected:
            return await continuation(details)
        handler = await continuation(details)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")

        if handler is not None and handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def _status_for(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, DvDError):
        return exc.code, short_message(str(exc))
    log.error("unhandled error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, short_message(f"internal error in {method}: {type(exc).__name__}")


def _guard_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status code
            await context.abort(*_status_for(exc, method))

    return guarded


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await context.abort(*_status_for(exc, method))

    return guarded


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def add_health_and_reflection(server: Any, service_names: list[str], aio: bool) -> Any:
    """Register the standard health service (NOT_SERVING until set) and server reflection."""
    servicer = health.aio.HealthServicer() if aio else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return servicer


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


class AdminService(admin_pb2_grpc.AdminServicer):
    """Answers GetServerInfo with facts fixed at start-up."""

    def __init__(self, info: admin_pb2.ServerInfo) -> None:
        self._info = info

    def GetServerInfo(self, request: admin_pb2.GetServerInfoRequest, context: Any) -> admin_pb2.ServerInfo:
        return self._info


class AsyncAdminService(AdminService):
    """AdminService for grpc.aio servers."""

    async def GetServerInfo(self, request: admin_pb2.GetServerInfoRequest, context: Any) -> admin_pb2.ServerInfo:
        return self._info


def parameter_bytes(modules: list[Any]) -> int:
    """Bytes of every parameter of `modules`."""
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def server_info(role: str, checkpoint: Any, dtype: str, device: str, loaded: list[str], param_bytes: int) -> Any:
    """Build the ServerInfo of this process (with `language.engine: vllm`, of its engine too)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("dvd-serve")
    except PackageNotFoundError:
        package_version = "dev"
    return admin_pb2.ServerInfo(
        role=role,
        model_path=str(checkpoint.path),
        checkpoint_format=checkpoint.format,
        dtype=dtype,
        device=device,
        loaded_tensors=sorted(loaded),
        parameter_bytes=param_bytes,
        pid=os.getpid(),
        version=package_version,
    )
