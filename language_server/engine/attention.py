"""Paged attention plugged into the model's own Hugging Face attention modules.

The engine runs one packed forward per step: every scheduled token of every sequence in a
single [1, T] row, with per-token positions. transformers' attention modules compute q, k, v
and RoPE as usual and then call the function registered under `config._attn_implementation`
in `AttentionInterface`; ours is `paged_attention`. It receives the step's `AttentionMetadata`
through the forward kwargs (`attention_metadata=...`), writes the new keys and values into the
paged KV cache and lets the step's backend (SDPA or flash-attn) attend over each sequence's
cached context. Since "dvd_paged" has no entry in transformers' mask registry, the model builds
no attention mask: causality and sequence boundaries are the backend's business.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface

from language_server.engine.attention_metadata import AttentionBackend, AttentionMetadata
from language_server.engine.flash_backend import FlashAttentionBackend, flash_attn_available
from language_server.engine.sdpa_backend import SdpaBackend

PAGED_ATTENTION = "dvd_paged"


def paged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    attention_metadata: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `AttentionInterface` entry: [1, heads, T, head_dim] q, k, v -> [1, T, heads, head_dim]."""
    if attention_metadata is None:
        raise RuntimeError(f"'{PAGED_ATTENTION}' attention runs only inside the engine (no attention_metadata given)")
    meta = attention_metadata
    query, key, value = (t[0].transpose(0, 1) for t in (query, key, value))
    meta.kv_cache.write(module.layer_idx, meta.slot_mapping, key, value)
    sinks = kwargs.get("s_aux")  # GPT-OSS's attention sinks
    out = meta.backend.attend(query, key, value, module.layer_idx, meta, scaling, sliding_window, sinks)
    return out.unsqueeze(0), None


AttentionInterface.register(PAGED_ATTENTION, paged_attention)


_LAYER_TYPES = {"full_attention", "sliding_attention"}


def unsupported_features(config) -> list[str]:  # noqa: ANN001 - any transformers text config
    """What an LLM's config asks of attention that the paged engine cannot do (empty: it can run it)."""
    layer_types = set(getattr(config, "layer_types", None) or [])
    if layer_types - _LAYER_TYPES:
        return [f"{', '.join(sorted(layer_types - _LAYER_TYPES))} layers"]
    return []


def windows_or_sinks(config) -> list[str]:  # noqa: ANN001 - any transformers text config
    """The attention features beyond full causal attention that an LLM uses (the SDPA backend runs them)."""
    used = []
    if "sliding_attention" in (getattr(config, "layer_types", None) or []) or getattr(config, "use_sliding_window", False):
        used.append("sliding-window layers")
    if getattr(config, "model_type", "") == "gpt_oss":
        used.append("attention sinks")
    return used


def use_paged_attention(causal_lm: nn.Module) -> None:
    """Point the model's attention modules at `paged_attention`; reject layers it cannot run."""
    missing = unsupported_features(causal_lm.config)
    if missing:
        raise ValueError(f"the paged engine cannot run {' or '.join(missing)}")
    causal_lm.set_attn_implementation(PAGED_ATTENTION)
    if causal_lm.config._attn_implementation != PAGED_ATTENTION:
        raise ValueError(f"{type(causal_lm).__name__} does not let the engine set its attention implementation")


def select_backend(name: str, device: torch.device, dtype: torch.dtype, features: list[str] = ()) -> AttentionBackend:
    """`sdpa`, `flash_attn`, or for `auto` flash-attn where it can run (importable, CUDA, 16-bit, none of
    `features` from `windows_or_sinks`) else SDPA."""
    if name == "sdpa":
        return SdpaBackend()
    flash_fits = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not features
    if name == "flash_attn" and features:
        raise ValueError(f"attn_backend: flash_attn does not run {' and '.join(features)} here; use sdpa or auto")
    if name == "flash_attn":
        if not flash_attn_available():
            raise ValueError("attn_backend: flash_attn is not importable here (install the 'gpu' extra)")
        if not flash_fits:
            raise ValueError(f"attn_backend: flash_attn needs a CUDA device and float16/bfloat16, got {device}, {dtype}")
        return FlashAttentionBackend()
    if name == "auto":
        return FlashAttentionBackend() if flash_fits and flash_attn_available() else SdpaBackend()
    raise ValueError(f"attn_backend: unknown backend {name!r} (auto, sdpa, flash_attn)")
