"""Process-level set-up shared by the server entry points."""

from __future__ import annotations

import ctypes
import signal

import torch


def configure_torch(threads: int) -> None:
    """Apply the configured CPU thread budget (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)


def start_metrics(host: str, port: int, offset: int = 0) -> None:
    """Serve Prometheus /metrics at host:port+offset; port 0 disables it."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port + offset, addr=host)


def die_with_parent() -> None:
    """Linux: ask the kernel to SIGTERM this process when its parent dies (use as preexec_fn)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass
