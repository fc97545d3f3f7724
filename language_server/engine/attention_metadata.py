"""What attention needs to know about one packed step, and the backend protocol that reads it.

Its own module so that `attention.py` (which picks a backend) and the backends (which read the
metadata) both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from language_server.engine.kv_cache import KVCache


class AttentionBackend(Protocol):
    """Attention over the paged KV cache for one packed step."""

    name: str

    def plan(self, metadata: AttentionMetadata) -> object:
        """Per-step work shared by all layers (index tensors, masks); stored as `metadata.plan`."""

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
        metadata: AttentionMetadata, scaling: float, sliding_window: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[T, heads, head_dim] queries (and this step's keys and values, already in the cache)
        -> [T, heads, head_dim] outputs; `sliding_window` and `sinks` ([heads] logits) as the
        layer has them."""


@dataclass
class AttentionMetadata:
    """What attention needs to know about one packed step; built once, read by every layer.

    Sequence i owns query rows `query_start[i] : query_start[i + 1]` of the packed batch; its
    queries are the last `query_lens[i]` of its `context_lens[i]` tokens, whose cache slots in
    order are `context_slots[i]`.
    """

    kv_cache: KVCache
    backend: AttentionBackend
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    query_start: list[int]  # cumulative query lengths, one more entry than sequences
    context_lens: list[int]
    context_slots: list[torch.Tensor]
    plan: object = None

    @property
    def query_lens(self) -> list[int]:
        return [b - a for a, b in zip(self.query_start, self.query_start[1:])]
