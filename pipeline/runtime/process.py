"""Process-level set-up shared by the server entry points."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit systems
TRIM_THRESHOLD = 1 << 30
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """glibc: serve blocks up to 32 MB from the heap and keep freed memory there for reuse.

    By default glibc maps every block over 128 kB fresh from the kernel, or trims it back on
    free, so each engine step page-faults its way through memory it released a step earlier
    (a step's logits tensor, for one). These settings keep such blocks in the heap for the next
    step; the price is a resident size that stays at its peak. Returns whether the settings were applied: not where the
    environment sets glibc's own MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_, nor off glibc."""
    if any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def configure_torch(threads: int, cpus: tuple[int, ...] = ()) -> None:
    """Apply the configured CPU budget: bind this process to `cpus` (empty: leave it unbound), then
    set torch's intra-op threads (0: one per bound CPU, or torch's default when unbound). Also
    keeps freed memory in the heap (`keep_freed_memory`).
    Exits with status 2 when `cpus` names CPUs this process may not use."""
    keep_freed_memory()
    if cpus:
        bind_cpus(cpus)
        threads = threads or len(cpus)
    if threads > 0:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)


def bind_cpus(cpus: tuple[int, ...]) -> None:
    """Bind every thread of this process, and the threads it starts later, to `cpus`."""
    allowed = os.sched_getaffinity(0)
    if not set(cpus) <= allowed:
        print(f"error: cpus {list(cpus)}: this process may use only CPUs {sorted(allowed)}", file=sys.stderr)
        raise SystemExit(2)
    for thread in os.listdir("/proc/self/task"):  # sched_setaffinity binds one thread, not the process
        try:
            os.sched_setaffinity(int(thread), cpus)
        except ProcessLookupError:  # the thread has exited
            pass


def bind_process_tree(pid: int, cpus: tuple[int, ...]) -> int:
    """Bind every thread of process `pid` and of all its descendants to `cpus` (threads that bound
    themselves to some of those CPUs keep to them). For engines whose processes re-bind their
    threads at start (vLLM's CPU workers, through libnuma) to hold them to a CPU budget.
    Returns the number of threads bound."""
    import psutil

    cpus_set = set(cpus)
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    bound = 0
    for process in processes:
        try:
            threads = os.listdir(f"/proc/{process.pid}/task")
        except FileNotFoundError:
            continue
        for thread in threads:
            try:
                current = os.sched_getaffinity(int(thread))
                os.sched_setaffinity(int(thread), (current & cpus_set) or cpus_set)
                bound += 1
            except (ProcessLookupError, PermissionError):  # exited, or not ours to bind
                pass
    return bound


def start_metrics(host: str, port: int, offset: int = 0) -> None:
    """Serve Prometheus /metrics at host:port+offset; port 0 disables it."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port + offset, addr=host)


PARENT_PID_ENV = "DVD_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def launched_env(env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a server this process launches: `env` (or ours) naming us as its parent."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """Linux: have the kernel SIGTERM this server when the launcher named in DVD_PARENT_PID dies.

    Done here, after exec, rather than in a Popen preexec_fn: code run between fork and exec is
    unsafe in a launcher that has threads (gRPC's), and the child can die before it execs.
    The kernel's "parent" here is the launcher's thread that forked us, not its process: the
    signal also comes when that thread exits, so launchers start servers from their main thread
    (ServerProcess.start enforces it).
    """
    parent = os.environ.pop(PARENT_PID_ENV, None)  # so that our own children do not inherit it
    if parent is None:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def server_args(prog: str, description: str, argv: list[str] | None, replica: bool = False):
    """Every server's start: tie it to its launcher (die_with_parent), parse its command line and
    load its config; exits with status 2 on a config error."""
    import argparse

    from pipeline.config import ConfigError, load_config, parse_override
    from pipeline.runtime.secrets import take_secrets

    die_with_parent()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="deployment YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    if replica:
        parser.add_argument("--replica", type=int, default=0, help="replica index (port offset)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, {**dict(parse_override(s) for s in args.set), **take_secrets()})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, config
