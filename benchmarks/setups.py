"""The bench's DvD and colocated setups: each one's config overrides and ports, and closed loops
against them with the CPU seconds their servers spend."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import server_cpu
from benchmarks.load import LoadResult, run_load
from benchmarks.report import Progress
from benchmarks.workloads import Workload
from pipeline.entrypoints.launch import Deployment

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "tiny.yaml"
PORT_BASE = 26000
PORTS_PER_SETUP = 20


@dataclass
class Setup:
    name: str
    mode: str
    vision_threads: int
    llm_threads: int
    vision_device: str = "cpu"
    llm_device: str = "cpu"
    vision_cpus: tuple[int, ...] = ()
    llm_cpus: tuple[int, ...] = ()
    engine: str = "builtin"  # language.engine
    kv_cache_gib: int = 1  # vllm.cpu_kv_cache_gib, with engine vllm
    flash: bool = False  # runs the model's -Flash variant (ViR)

    def overrides(self, model_path: str, dtype: str, batch_tiles: int, kv_blocks: int,
                  max_num_seqs: int) -> dict[str, Any]:
        engine: dict[str, Any] = {}
        if self.engine == "vllm":
            engine = {"language.engine": "vllm", "vllm.cpu_kv_cache_gib": self.kv_cache_gib}
        return engine | {
            "language.num_kv_blocks": kv_blocks,
            "language.max_num_seqs": max_num_seqs,
            "vision.device": self.vision_device,
            "language.device": self.llm_device,
            "vision.max_batch_tiles": batch_tiles,
            "mode": self.mode,
            "model.path": model_path,
            "vision.dtype": dtype,
            "language.dtype": dtype,
            "vision.threads": self.vision_threads,
            # vLLM runs one thread per CPU of language.cpus and refuses language.threads beside them
            "language.threads": 0 if self.engine == "vllm" else self.llm_threads,
            "vision.cpus": list(self.vision_cpus),
            "language.cpus": list(self.llm_cpus),
            "vision.feature_cache_bytes": 0,  # every request pays for its images
            "log_level": "warning",
        }


def setup_ports(index: int, base: int) -> dict[str, int]:
    start = base + PORTS_PER_SETUP * index
    return {
        "vision.job_port": start,
        "vision.grpc_port": start + 1,
        "vision.metrics_port": start + 2,
        "language.grpc_port": start + 3,
        "language.feature_port": start + 4,
        "language.metrics_port": start + 5,
        "language.http_port": start + 6,  # unused by the bench, but each setup's servers bind one
    }


def run_metered(deployment: Deployment, workload: Workload, total: int, label: str, **load: Any) -> LoadResult:
    return server_cpu.metered(deployment, lambda: asyncio.run(
        run_load(deployment.address, workload.request, total, progress=Progress(total, label), **load)
    ))


def warm(deployment: Deployment, workload: Workload, count: int) -> None:
    asyncio.run(run_load(deployment.address, workload.request, count, concurrency=count))
