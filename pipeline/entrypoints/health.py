"""Whether a started server is up: its gRPC health service reports SERVING, and it is the process
the launcher started (not another one holding the port)."""

from __future__ import annotations

import time
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeline.runtime.tls import TlsDial
from proto.dvd.v1 import admin_pb2, admin_pb2_grpc

HEALTH_ATTEMPT_S = 1.0
OWNER_CHECK_S = 10.0


class LaunchError(RuntimeError):
    """A server failed to start or to become healthy."""


class StartInterrupted(LaunchError):
    """Start-up was cancelled (Ctrl-C) before every server was healthy."""


# A server that takes a minute to start (vLLM's engine) refuses connections until then, and gRPC's
# reconnect backoff grows meanwhile (x1.6 per attempt): capped at 1 s, readiness is seen within a second.
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]


def _channel(address: str, tls: TlsDial | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    return tls.channel(address, _CHANNEL_OPTIONS)


def wait_healthy(
    address: str,
    timeout_s: float,
    is_alive: Callable[[], bool] = lambda: True,
    cancelled: Callable[[], bool] = lambda: False,
    tls: TlsDial | None = None,
) -> None:
    """Block until the gRPC health service at `address` reports SERVING (or raise LaunchError).

    Whatever answers there counts; ServerProcess.wait_ready also checks that it is its own process."""
    deadline = time.monotonic() + timeout_s
    with _channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if cancelled():
                raise StartInterrupted(f"start-up interrupted while waiting for {address}")
            if not is_alive():
                raise LaunchError(f"the server for {address} exited during start-up")
            try:
                for reply in stub.Watch(
                    health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_ATTEMPT_S, wait_for_ready=True
                ):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    raise LaunchError(f"health check of {address} failed: {exc.details()}") from None
    raise LaunchError(f"{address} did not become healthy within {timeout_s:g} s")


def check_owner(address: str, pid: int, api_key: str = "", tls: TlsDial | None = None) -> None:
    """Raise LaunchError unless the DvD server answering at `address` is process `pid`."""
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    with _channel(address, tls) as channel:
        try:
            info = admin_pb2_grpc.AdminStub(channel).GetServerInfo(
                admin_pb2.GetServerInfoRequest(), timeout=OWNER_CHECK_S, metadata=metadata
            )
        except grpc.RpcError as exc:
            raise LaunchError(
                f"{address} is held by another process: something answers health checks there, "
                f"but not dvd.v1.Admin as the server started here ({exc.code().name})"
            ) from None
    if info.pid != pid:
        raise LaunchError(
            f"{address} is held by another process: a DvD {info.role or 'server'} with pid {info.pid} "
            f"answers there, not the server started here (pid {pid}); stop it or choose other ports"
        )
