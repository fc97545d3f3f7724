"""Transport backends by the name used in YAML (`transport.backend`), each imported on first use."""

from __future__ import annotations

import importlib

from pipeline.config import TransportConfig
from pipeline.transport.base import TransportBackend, TransportError

_BACKENDS: dict[str, str] = {
    "tcp": "pipeline.transport.tcp:TcpBackend",
    "shm": "pipeline.transport.shm:ShmBackend",
    "nixl": "pipeline.transport.nixl:NixlBackend",  # optional: pip install -e ".[rdma]"
}


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def create_backend(config: TransportConfig) -> TransportBackend:
    """Import and instantiate the backend named by config.backend."""
    try:
        target = _BACKENDS[config.backend]
    except KeyError:
        raise TransportError(f"unknown transport backend {config.backend!r} (known: {backend_names()})") from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TransportError(f"transport backend {config.backend!r} is not available: {exc}") from exc
    return getattr(module, class_name)(config)
