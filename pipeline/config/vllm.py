"""The `vllm:` section of a deployment: vLLM's engine behind the language server (language.engine: vllm)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.config.fields import positive

_CPU_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


@dataclass(frozen=True)
class VllmEngineConfig:
    """Settings passed to vLLM's engine; language.dtype, max_model_len, max_num_seqs and
    max_num_batched_tokens apply to it as to the builtin engine."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: Literal["mp", "ray", "uni"] = "mp"  # ray: across hosts
    gpu_memory_utilization: float = 0.9  # GPU hosts: fraction of each GPU's memory vLLM may take
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # GPU hosts: no CUDA graphs
    cpu_kv_cache_gib: float = 4.0  # CPU hosts: KV-cache size (VLLM_CPU_KVCACHE_SPACE)
    # CPU hosts: the CPUs vLLM's threads are bound to, one thread each (VLLM_CPU_OMP_THREADS_BIND):
    # "auto" = language.cpus when set, else vLLM's own choice; "nobind"; or a list such as "0-3" or "1,3"
    cpu_threads_bind: str = "auto"

    def check(self) -> None:
        positive(self, "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "cpu_kv_cache_gib")
        if self.gpu_memory_utilization > 1:
            raise ValueError(f"gpu_memory_utilization must be <= 1, got {self.gpu_memory_utilization}")
        if self.cpu_threads_bind not in ("auto", "nobind") and not _CPU_LIST.fullmatch(self.cpu_threads_bind):
            raise ValueError(
                f"cpu_threads_bind: expected auto, nobind or a CPU list such as 0-3 or 1,3, got {self.cpu_threads_bind!r}"
            )

    def threads_bind(self, cpus: tuple[int, ...]) -> str:
        """The value for VLLM_CPU_OMP_THREADS_BIND."""
        if self.cpu_threads_bind == "auto":
            return ",".join(map(str, cpus)) if cpus else "auto"
        return self.cpu_threads_bind
