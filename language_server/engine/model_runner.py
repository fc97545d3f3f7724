"""One packed forward of the language model for a scheduled step."""

from __future__ import annotations

from bisect import bisect_left
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from language_server.engine import cpu_linear
from language_server.engine.attention_metadata import AttentionBackend, AttentionMetadata
from language_server.engine.kv_cache import KVCache
from language_server.engine.scheduler import ScheduledChunk
from language_server.model import LanguageModel


@dataclass
class StepInputs:
    """The packed inputs of one step."""

    embeds: torch.Tensor  # [1, T, hidden]
    positions: torch.Tensor  # [1, T]
    sample_rows: torch.Tensor  # rows whose logits are sampled: the last token of each finishing chunk
    metadata: AttentionMetadata


class ModelRunner:
    """Turns scheduled chunks into one ragged forward over the Hugging Face model and returns the
    logits of the rows that yield a token."""

    def __init__(
        self, model: LanguageModel, kv_cache: KVCache, backend: AttentionBackend, fast_linear: bool = False
    ) -> None:
        self.model = model
        self.linear_kernel = cpu_linear.enabled if fast_linear else nullcontext
        self.kv_cache = kv_cache
        self.backend = backend
        self.block_size = kv_cache.block_size
        self._block_offsets = torch.arange(self.block_size)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """[number of chunks that reach their sequence's end, vocab] float32 logits, in chunk order."""
        inputs = self.prepare(chunks)
        with self.linear_kernel():
            out = self.model.causal_lm(
                inputs_embeds=inputs.embeds,
                position_ids=inputs.positions,
                use_cache=False,
                logits_to_keep=inputs.sample_rows,
                attention_metadata=inputs.metadata,
            )
        return out.logits[0].float()

    def prepare(self, chunks: list[ScheduledChunk]) -> StepInputs:
        device = self.model.device
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        new_slots: list[torch.Tensor] = []
        context_slots: list[torch.Tensor] = []
        query_start = [0]
        sample_rows: list[int] = []
        images: list[tuple[list[int], torch.Tensor]] = []  # (packed rows, feature rows) of each chunk
        for chunk in chunks:
            seq, offset = chunk.seq, query_start[-1]
            ids += seq.token_slice(chunk.start, chunk.stop)
            slots = self._slots(seq.block_table, chunk.stop)
            context_slots.append(slots.to(device))
            new_slots.append(slots[chunk.start :])
            positions.append(torch.arange(chunk.start, chunk.stop))
            query_start.append(offset + chunk.length)
            if chunk.samples:
                sample_rows.append(offset + chunk.length - 1)
            found = self._image_rows(chunk)
            if found is not None:
                images.append(([offset + position for position in found[0]], found[1]))
        embeds = self.model.causal_lm.get_input_embeddings()(torch.tensor(ids, device=device))
        for where, rows in images:  # straight from the sequence's rows: no joined copy
            embeds[torch.tensor(where, device=device)] = rows.to(device=device, dtype=embeds.dtype)
        metadata = AttentionMetadata(
            kv_cache=self.kv_cache,
            backend=self.backend,
            slot_mapping=torch.cat(new_slots).to(device),
            query_start=query_start,
            context_lens=[c.stop for c in chunks],
            context_slots=context_slots,
        )
        metadata.plan = self.backend.plan(metadata)
        return StepInputs(
            embeds=embeds.unsqueeze(0),
            positions=torch.cat(positions).unsqueeze(0).to(device),
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
            metadata=metadata,
        )

    def _slots(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """Cache slots of a sequence's first `num_tokens` tokens."""
        blocks = torch.tensor(block_table, dtype=torch.long).unsqueeze(1)
        return (blocks * self.block_size + self._block_offsets).flatten()[:num_tokens]

    @staticmethod
    def _image_rows(chunk: ScheduledChunk) -> tuple[list[int], torch.Tensor] | None:
        """(chunk-relative positions, a view of the feature rows) of the image placeholders inside
        the chunk, from the positions the sequence found once.

        Only prompt positions take features: a generated <IMG_CONTEXT> token is embedded as a token.
        """
        seq = chunk.seq
        prompt_stop = min(chunk.stop, len(seq.prompt_ids))
        if seq.image_rows is None or chunk.start >= prompt_stop:
            return None
        first = bisect_left(seq.image_positions, chunk.start)
        stop = bisect_left(seq.image_positions, prompt_stop)
        if first == stop:
            return None
        return [p - chunk.start for p in seq.image_positions[first:stop]], seq.image_rows[first:stop]
