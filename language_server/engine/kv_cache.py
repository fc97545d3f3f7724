"""The paged KV cache: one key and one value tensor per layer, addressed by slot."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from pipeline.config import LanguageConfig


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one token's keys and values across the model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, text_config, dtype: torch.dtype) -> KVCacheSpec:
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        return cls(text_config.num_hidden_layers, text_config.num_key_value_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def plan_num_blocks(config: LanguageConfig, spec: KVCacheSpec, device: torch.device) -> int:
    """`num_kv_blocks` when set; else `kv_cache_memory_fraction` of free memory, but never more
    blocks than `max_num_seqs` sequences of `max_model_len` tokens could use."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    bytes_per_block = spec.bytes_per_token * config.block_size
    affordable = int(config.kv_cache_memory_fraction * free_memory_bytes(device)) // bytes_per_block
    usable = config.max_num_seqs * math.ceil(config.max_model_len / config.block_size)
    blocks = min(affordable, usable)
    if blocks < math.ceil(config.max_model_len / config.block_size):
        needed = math.ceil(config.max_model_len / config.block_size) * bytes_per_block
        raise ValueError(
            f"kv_cache_memory_fraction {config.kv_cache_memory_fraction} of free memory gives {blocks} KV blocks, "
            f"fewer than one max_model_len sequence needs ({needed / 2**20:.0f} MiB); "
            "raise it, lower max_model_len, or set num_kv_blocks"
        )
    return blocks


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, or available RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class KVCache:
    """Keys and values of every cached token, [num_blocks * block_size, kv_heads, head_dim] per layer.

    A slot is `block * block_size + offset`. The tensors are allocated uninitialised: attention
    reads only slots that the same step or an earlier one wrote.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, device: torch.device) -> None:
        self.spec = spec
        self.block_size = block_size
        shape = (spec.num_layers, num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        self.keys = torch.empty(shape, dtype=spec.dtype, device=device)
        self.values = torch.empty(shape, dtype=spec.dtype, device=device)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store [T, kv_heads, head_dim] keys and values of T new tokens at their slots."""
        self.keys[layer].index_copy_(0, slots, keys.to(self.spec.dtype))
        self.values[layer].index_copy_(0, slots, values.to(self.spec.dtype))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `slots` (any shape S): [*S, kv_heads, head_dim] each."""
        flat = slots.flatten()
        shape = (*slots.shape, self.spec.num_kv_heads, self.spec.head_dim)
        return self.keys[layer].index_select(0, flat).view(shape), self.values[layer].index_select(0, flat).view(shape)
