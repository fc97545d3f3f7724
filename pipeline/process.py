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


def server_args(prog: str, description: str, argv: list[str] | None, replica: bool = False):
    """Parse a server's command line and load its config; exits with status 2 on a config error."""
    import argparse
    import sys

    from pipeline.config import ConfigError, load_config, parse_override

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="deployment YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    if replica:
        parser.add_argument("--replica", type=int, default=0, help="replica index (port offset)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, dict(parse_override(s) for s in args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, config
