"""Paged attention with flash-attn's variable-length kernel (CUDA, float16 / bfloat16).

Every sequence's context is gathered from the paged cache into one packed key/value tensor and
the whole step (prefill chunks and decodes alike) is a single `flash_attn_varlen_func` call with
bottom-right-aligned causal masking, which is exactly "each query sees its own prefix".
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from language_server.engine.attention_metadata import AttentionMetadata


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@dataclass
class FlashPlan:
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    cu_seqlens_k: torch.Tensor  # int32 [num_seqs + 1]
    max_seqlen_q: int
    max_seqlen_k: int
    slots: torch.Tensor  # every sequence's context slots, concatenated


class FlashAttentionBackend:
    """One varlen flash-attn call per layer over keys and values gathered from the paged cache."""

    name = "flash_attn"

    def __init__(self, varlen_kernel: Callable[..., torch.Tensor] | None = None) -> None:
        if varlen_kernel is None:
            from flash_attn import flash_attn_varlen_func as varlen_kernel
        self._kernel = varlen_kernel

    def plan(self, meta: AttentionMetadata) -> FlashPlan:
        device = meta.slot_mapping.device
        context_start = [0]
        for length in meta.context_lens:
            context_start.append(context_start[-1] + length)
        return FlashPlan(
            cu_seqlens_q=torch.tensor(meta.query_start, dtype=torch.int32, device=device),
            cu_seqlens_k=torch.tensor(context_start, dtype=torch.int32, device=device),
            max_seqlen_q=max(meta.query_lens),
            max_seqlen_k=max(meta.context_lens),
            slots=torch.cat(meta.context_slots),
        )

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
        meta: AttentionMetadata, scaling: float, sliding_window: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if sliding_window is not None or sinks is not None:  # select_backend keeps such models off this backend
            raise ValueError("the flash_attn backend runs neither sliding-window layers nor attention sinks")
        plan: FlashPlan = meta.plan
        keys, values = meta.kv_cache.read(layer, plan.slots)
        return self._kernel(
            query,
            keys.to(query.dtype),
            values.to(query.dtype),
            cu_seqlens_q=plan.cu_seqlens_q,
            cu_seqlens_k=plan.cu_seqlens_k,
            max_seqlen_q=plan.max_seqlen_q,
            max_seqlen_k=plan.max_seqlen_k,
            softmax_scale=scaling,
            causal=True,
        )
