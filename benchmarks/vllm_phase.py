"""`make bench`'s vLLM phase: plain vLLM in its ordinary serving mode (its OpenAI-compatible HTTP
server, `benchmarks/vllm_server.py`) and DvD with `language.engine: vllm`, with and without ViR,
on the same closed loop (bench.py's docstring describes the setups)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from benchmarks import server_cpu
from benchmarks.http_load import run_chat_load, workload_bodies
from benchmarks.load import LoadResult
from benchmarks.models import bench_flash_model
from benchmarks.report import RESULTS, Progress
from benchmarks.setups import BASE_CONFIG, Setup, run_metered, setup_ports, warm
from benchmarks.vllm_server import VllmServer, VllmStartError, kv_cache_gib, vllm_import_error
from benchmarks.workloads import Workload
from pipeline.config import LanguageConfig, load_config
from pipeline.entrypoints.launch import Deployment, LaunchError

VLLM_START_S = 900.0  # longest wait for a server with a vLLM engine to become healthy
VLLM_ORDER = ("dvd-vllm", "vllm-b", "dvd-vllm-vir", "vllm-a")  # the report's row order


def run_vllm(server: VllmServer, workload: Workload, total: int, label: str, concurrency: int,
             bodies: Callable[[int], dict[str, Any]] | None = None) -> LoadResult:
    """A closed loop against plain vLLM, with the CPU seconds of its processes (server and engine);
    the workload's requests unless `bodies` makes them."""
    bodies = bodies or workload_bodies(workload, server.name)
    return server_cpu.metered_pids({"vllm": server.process.pid}, lambda: asyncio.run(
        run_chat_load(server.base_url, bodies, total, concurrency, progress=Progress(total, label))
    ))


def warm_vllm(server: VllmServer, workload: Workload, count: int) -> None:
    result = asyncio.run(run_chat_load(server.base_url, workload_bodies(workload, server.name), count, count))
    failed = [r.error for r in result.records if not r.completed]
    if failed:
        raise RuntimeError(f"{server.name}: warm-up requests failed: {failed[0]}")


# Pairs of vLLM setups that run side by side, stage by stage; between stages one server is swapped
# for another, so that at most two vLLM engines are up at a time and each ratio's runs lie together.
VLLM_STAGES = (("dvd-vllm", "vllm-b"), ("dvd-vllm", "vllm-a"), ("dvd-vllm-vir", "vllm-a"), ("dvd-vllm-vir", "vllm-b"))


def run_phase(args: argparse.Namespace, workload: Workload, model_path: Path, setups: list[Setup],
              servers: list[VllmServer], info: dict[str, Any],
              log_dir: Path) -> tuple[dict[str, list[LoadResult]], str | None]:
    """The vLLM setups' closed loops at `workload`, stage by stage (VLLM_STAGES): each stage runs
    `--rounds` rounds of its two setups, alternating. Returns their results by setup and what
    stopped the phase early (None when nothing did). Stops every server it starts."""
    results: dict[str, list[LoadResult]] = defaultdict(list)
    planned: dict[str, Setup | VllmServer] = {setup.name: setup for setup in setups} | {s.name: s for s in servers}
    running: dict[str, Deployment | VllmServer] = {}

    def start(name: str) -> None:
        item = planned[name]
        if isinstance(item, VllmServer):
            print(f"starting {name} (plain vLLM, OpenAI HTTP server on port {item.port}, cpus {list(item.cpus)})")
            running[name] = server = replace(item).start(VLLM_START_S)  # a fresh process each time
            warm_vllm(server, workload, 2)
            return
        path = info["flash_model"] if item.flash else str(model_path)
        overrides = {
            **item.overrides(path, args.dtype, args.vision_batch_tiles, args.kv_blocks, args.max_num_seqs),
            **setup_ports(3 + setups.index(item), args.port_base),
        }
        print(f"starting {name} (decoupled, vision {item.vision_threads} threads on cpus {list(item.vision_cpus)}, "
              f"vLLM engine on cpus {list(item.llm_cpus)})")
        running[name] = deployment = Deployment(BASE_CONFIG, overrides, log_dir=log_dir / name).start(VLLM_START_S)
        warm(deployment, workload, 2)

    def run(name: str, label: str) -> LoadResult:
        target = running[name]
        if isinstance(target, VllmServer):
            return run_vllm(target, workload, args.requests, label, args.concurrency)
        return run_metered(target, workload, args.requests, label, concurrency=args.concurrency)

    try:
        for stage in (pair for pair in VLLM_STAGES if all(name in planned for name in pair)):
            for name in [name for name in running if name not in stage]:
                running.pop(name).stop()
            for name in stage:
                if name not in running:
                    start(name)
            for round_index in range(args.rounds):
                suffix = f" ({round_index + 1}/{args.rounds})" if args.rounds > 1 else ""
                for name in stage:
                    results[name].append(run(name, f"{name} {workload.name}{suffix}"))
    except (LaunchError, VllmStartError, RuntimeError, OSError) as exc:
        print(f"vLLM phase stopped: {exc}")
        return results, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for target in running.values():
            target.stop()
    return results, None


def skip_reason(args: argparse.Namespace) -> str | None:
    """Why the vLLM setups cannot run here, or None."""
    if args.vllm is False:
        return "--no-vllm"
    if args.device != "cpu" or (args.vision_device or args.device) != "cpu":
        return "the vLLM setups are laid out for CPU runs (thread budgets bound to CPUs)"
    needed = args.vision_threads + args.llm_threads
    allowed = len(os.sched_getaffinity(0))
    if allowed < needed:
        return f"binding needs {needed} CPUs (vision + llm threads); this process may use {allowed}"
    return vllm_import_error()


def plan(args: argparse.Namespace, model_path: Path) -> tuple[list[Setup], list[VllmServer], dict[str, Any]]:
    """DvD's setups with vLLM's engine, the plain vLLM servers and what the report says of them.
    CPUs: DvD's vision server gets the first --vision-threads of this process's CPUs and vLLM the
    next --llm-threads (the CPUs --bind-cpus gives DvD); plain vLLM (b) gets both sets, (a) the
    second."""
    allowed = sorted(os.sched_getaffinity(0))
    vision_cpus = tuple(allowed[: args.vision_threads])
    llm_cpus = tuple(allowed[args.vision_threads : args.vision_threads + args.llm_threads])
    kv_gib = args.vllm_kv_cache_gib or kv_cache_gib(model_path, args.kv_blocks * LanguageConfig.block_size, args.dtype)
    flash = bench_flash_model(args.model, args.device)
    dvd = dict(mode="decoupled", vision_threads=args.vision_threads, llm_threads=len(llm_cpus),
               vision_cpus=vision_cpus, llm_cpus=llm_cpus, engine="vllm", kv_cache_gib=kv_gib)
    setups = [Setup("dvd-vllm", **dvd)]
    if flash is not None:
        setups.append(Setup("dvd-vllm-vir", flash=True, **dvd))
    base = len(setups) + 3  # port blocks after the three DvD-vs-colocated setups and DvD's vLLM setups
    servers = [
        plain_server(name, cpus, setup_ports(base + i, args.port_base)["vision.job_port"], model_path, args.dtype,
                     args.max_num_seqs, kv_gib, RESULTS / "logs" / name)
        for i, (name, cpus) in enumerate((("vllm-b", vision_cpus + llm_cpus), ("vllm-a", llm_cpus)))
    ]
    engine = servers[0]  # every plain vLLM engine has DvD's engine settings
    info = {
        "kv_cache_gib": kv_gib,
        "flash_model": str(flash) if flash is not None else None,
        "setups": (f"dvd-vllm: DvD, vision server on cpus {list(vision_cpus)} ({args.vision_threads} threads), "
                   f"vLLM engine on cpus {list(llm_cpus)}; "
                   + (f"dvd-vllm-vir: the same on {flash.name} of {flash.parent.name} (ViR router); "
                      if flash is not None else f"dvd-vllm-vir: not run ({args.model} has no -Flash variant); ")
                   + f"vllm-b: plain vLLM on cpus {list(vision_cpus + llm_cpus)}; "
                   f"vllm-a: plain vLLM on cpus {list(llm_cpus)}; every vLLM engine: KV cache {kv_gib} GiB, "
                   f"max_num_seqs {args.max_num_seqs}, max_num_batched_tokens "
                   f"{engine.max_num_batched_tokens}, max_model_len {engine.max_model_len}, {args.dtype}."),
    }
    return setups, servers, info


def plain_server(name: str, cpus: tuple[int, ...], port: int, model_path: Path, dtype: str, max_num_seqs: int,
                 kv_cache_gib: int, log_dir: Path) -> VllmServer:
    """Plain vLLM (not started) with the engine settings DvD's language server passes to vLLM's engine,
    and the libraries it preloads."""
    from language_server.vllm_engine.args import cpu_preload

    language = load_config(BASE_CONFIG).language
    return VllmServer(model=model_path, port=port, name=name, cpus=cpus, dtype=dtype,
                      max_model_len=language.max_model_len, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=language.max_num_batched_tokens, kv_cache_gib=kv_cache_gib,
                      preload=tuple(cpu_preload()), log_path=log_dir / "vllm.log")
