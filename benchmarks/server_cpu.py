"""CPU time each server process of a deployment spends during a load run (Linux /proc), and the
steps its LLM engine took meanwhile (the language or colocated server's /metrics).

Throughput ratios between runs taken minutes apart move with this shared machine's slow spells.
How busy each server was *during* a run does not depend on the other runs: in a DvD run whose
slower stage is the LLM, the language server's CPU cores over its thread budget says how much of
the run the pipeline kept that stage at work. The figures count every thread of a process
(gRPC, feature receiver, preprocessing workers), not only the compute thread.

The engine's counters tell how many sequences shared each step. On a CPU a decode step has a
large fixed part (the LM head reads its whole weight, 151k x hidden, whatever the batch), so an
LLM that holds fewer sequences, as in a pipeline where some requests are still at the vision
stage, spends more CPU per request.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pipeline.launch import Deployment

if TYPE_CHECKING:
    from benchmarks.load import LoadResult

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far; None where /proc cannot tell (not Linux, gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime and stime: fields 14 and 15 of proc(5)


def server_pids(deployment: Deployment) -> dict[str, int]:
    """Server name ("vision-0", "language", "colocated") -> pid, for the servers that are running."""
    return {s.name: s.process.pid for s in deployment.servers if s.process is not None and s.alive}


def snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far per server; servers /proc cannot read are left out."""
    seconds = {name: process_cpu_s(pid) for name, pid in pids.items()}
    return {name: value for name, value in seconds.items() if value is not None}


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each server spent between two snapshots (servers present in both)."""
    return {name: after[name] - before[name] for name in before if name in after}


ENGINE_COUNTERS = ("dvd_engine_steps_total", "dvd_engine_sampling_steps_total", "dvd_engine_sampled_tokens_total")


def scrape(host: str, port: int) -> dict[str, float]:
    """Every sample of a server's Prometheus /metrics, by series (name and labels)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}


def engine_counters(deployment: Deployment) -> dict[str, float]:
    """The LLM engine's step counters so far; empty where the server exposes no /metrics."""
    language = deployment.config.language
    if not language.metrics_port:
        return {}
    try:
        samples = scrape(language.host, language.metrics_port)
    except OSError:  # urllib's URLError included
        return {}
    return {name: samples[name] for name in ENGINE_COUNTERS if name in samples}


def metered(deployment: Deployment, run: Callable[[], LoadResult]) -> LoadResult:
    """`run()`, with the CPU seconds each of the deployment's servers spent and the steps its
    LLM engine took meanwhile."""
    pids = server_pids(deployment)
    before, counters = snapshot(pids), engine_counters(deployment)
    result = run()
    result.server_cpu_s = spent(before, snapshot(pids))
    result.engine_counters = spent(counters, engine_counters(deployment))
    return result
