"""CPU time each server process of a deployment spends during a load run (Linux /proc).

Throughput ratios between runs taken minutes apart move with this shared machine's slow spells.
How busy each server was *during* a run does not depend on the other runs: in a DvD run whose
slower stage is the LLM, the language server's CPU cores over its thread budget says how much of
the run the pipeline kept that stage at work. The figures count every thread of a process
(gRPC, feature receiver, preprocessing workers), not only the compute thread.
"""

from __future__ import annotations

import os
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


def metered(deployment: Deployment, run: Callable[[], LoadResult]) -> LoadResult:
    """`run()`, with the CPU seconds each of the deployment's servers spent meanwhile."""
    pids = server_pids(deployment)
    before = snapshot(pids)
    result = run()
    result.server_cpu_s = spent(before, snapshot(pids))
    return result
