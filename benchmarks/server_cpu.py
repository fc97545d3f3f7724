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

A server's CPU includes its child processes' (vLLM's engine core and workers, with
`language.engine: vllm`, or plain vLLM's). With ViR on a -Flash checkpoint, the vision servers'
routing decisions (tiles kept at 256 tokens or compressed to 64) are counted over a run too.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pipeline.entrypoints.launch import Deployment

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


def tree_cpu_s(pid: int) -> float | None:
    """`process_cpu_s` of a process plus that of each of its live descendants; None where /proc
    cannot read the process itself."""
    own = process_cpu_s(pid)
    if own is None:
        return None
    return own + sum(process_cpu_s(child) or 0.0 for child in descendants(pid))


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])  # ppid: field 4 of proc(5)
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], list(children.get(pid, ()))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, ()))
    return found


def server_pids(deployment: Deployment) -> dict[str, int]:
    """Server name ("vision-0", "language", "colocated") -> pid, for the servers that are running."""
    return {s.name: s.process.pid for s in deployment.servers if s.process is not None and s.alive}


def snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far per server, its child processes included; servers /proc cannot read are left out."""
    seconds = {name: tree_cpu_s(pid) for name, pid in pids.items()}
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


VIR_TILES = "dvd_vision_vir_tiles_total"


def vir_tiles(deployment: Deployment) -> dict[str, float]:
    """Tiles the vision servers sent so far by tokens per tile ("256", "64"), over every replica;
    empty where no vision server exposes /metrics or none has routed a tile."""
    vision = deployment.config.vision
    if deployment.config.mode != "decoupled" or not vision.metrics_port:
        return {}
    counts: dict[str, float] = {}
    for replica in range(vision.replicas):
        try:
            samples = scrape(vision.host, vision.metrics_port + replica)
        except OSError:
            continue
        for series, value in samples.items():
            if series.startswith(VIR_TILES + "{"):
                tokens = series.split('tokens="', 1)[1].split('"', 1)[0]
                counts[tokens] = counts.get(tokens, 0.0) + value
    return counts


def metered(deployment: Deployment, run: Callable[[], LoadResult]) -> LoadResult:
    """`run()`, with the CPU seconds each of the deployment's servers spent, the steps its LLM
    engine took and the tiles its vision servers routed meanwhile."""
    pids = server_pids(deployment)
    before, counters, tiles = snapshot(pids), engine_counters(deployment), vir_tiles(deployment)
    result = run()
    result.server_cpu_s = spent(before, snapshot(pids))
    result.engine_counters = spent(counters, engine_counters(deployment))
    after = vir_tiles(deployment)
    result.vir_tiles = {tokens: after[tokens] - tiles.get(tokens, 0.0) for tokens in after}
    return result


def metered_pids(pids: dict[str, int], run: Callable[[], LoadResult]) -> LoadResult:
    """`run()`, with the CPU seconds each named process (its children included) spent meanwhile."""
    before = snapshot(pids)
    result = run()
    result.server_cpu_s = spent(before, snapshot(pids))
    return result
