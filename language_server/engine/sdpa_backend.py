"""Paged attention with torch's scaled_dot_product_attention (CPU and GPU).

Sliding-window layers (a query at position i sees keys j with i - window < j <= i, as transformers
masks them) get a banded mask; layers with attention sinks (GPT-OSS: one learned logit per head
that joins every softmax and is then dropped) run the same masks through `sink_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from language_server.engine.attention_metadata import AttentionMetadata


@dataclass
class DecodeGroup:
    """Sequences with a single query row, attended together over a padded gather of their contexts."""

    rows: torch.Tensor  # [B] packed query rows
    lengths: list[int]  # each sequence's context length
    slots: torch.Tensor  # [B, longest context] cache slots, padded with each sequence's first slot
    mask: torch.Tensor | None  # [B, 1, 1, longest context], True = attend; None when no padding


@dataclass
class PrefillSlice:
    """One sequence with several query rows (a prompt or a prompt chunk), attended on its own."""

    start: int
    length: int
    slots: torch.Tensor | None  # cache slots of the whole context; None = no cached prefix
    mask: torch.Tensor | None  # [length, context] causal mask shifted by the cached prefix


@dataclass
class SdpaPlan:
    decode: DecodeGroup | None
    prefills: list[PrefillSlice]
    windowed: dict[int, tuple] = field(default_factory=dict)  # window -> (decode mask, prefill masks)


class SdpaBackend:
    """Gathers each sequence's keys and values from the paged cache and runs SDPA.

    Single-token queries (decodes) share one batched call; multi-token queries run one call per
    sequence, causal within the chunk and seeing the whole cached prefix.
    """

    name = "sdpa"

    def plan(self, meta: AttentionMetadata) -> SdpaPlan:
        device = meta.slot_mapping.device
        decode_ids = [i for i, n in enumerate(meta.query_lens) if n == 1]
        prefills = []
        for i, n in enumerate(meta.query_lens):
            if n == 1:
                continue
            context = meta.context_lens[i]
            if context == n:
                prefills.append(PrefillSlice(meta.query_start[i], n, None, None))
                continue
            prefix = context - n
            rows = torch.arange(n, device=device).unsqueeze(1)
            cols = torch.arange(context, device=device).unsqueeze(0)
            prefills.append(PrefillSlice(meta.query_start[i], n, meta.context_slots[i], cols <= rows + prefix))
        return SdpaPlan(self._decode_group(meta, decode_ids, device), prefills)

    def _window_masks(self, plan: SdpaPlan, window: int, device: torch.device) -> tuple:
        """The decode group's and each prefill slice's masks for a sliding-window layer (once per step)."""
        if window not in plan.windowed:
            decode_mask = None
            if plan.decode is not None:
                lengths = torch.tensor(plan.decode.lengths, device=device).unsqueeze(1)
                cols = torch.arange(plan.decode.slots.shape[1], device=device).unsqueeze(0)
                decode_mask = ((cols < lengths) & (cols >= lengths - window))[:, None, None, :]
            prefill_masks = []
            for part in plan.prefills:
                context = part.length if part.slots is None else part.slots.numel()
                rows = torch.arange(part.length, device=device).unsqueeze(1) + (context - part.length)
                cols = torch.arange(context, device=device).unsqueeze(0)
                prefill_masks.append((cols <= rows) & (cols > rows - window))
            plan.windowed[window] = (decode_mask, prefill_masks)
        return plan.windowed[window]

    def _decode_group(self, meta: AttentionMetadata, ids: list[int], device: torch.device) -> DecodeGroup | None:
        if not ids:
            return None
        lengths = [meta.context_lens[i] for i in ids]
        longest = max(lengths)
        slots = torch.stack(
            [_pad(meta.context_slots[i], longest) for i in ids]
        )
        mask = None
        if min(lengths) != longest:
            lengths_t = torch.tensor(lengths, device=device)
            mask = (torch.arange(longest, device=device).unsqueeze(0) < lengths_t.unsqueeze(1))[:, None, None, :]
        rows = torch.tensor([meta.query_start[i] for i in ids], device=device)
        return DecodeGroup(rows, lengths, slots, mask)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
        meta: AttentionMetadata, scaling: float, sliding_window: int | None = None, sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan: SdpaPlan = meta.plan
        out = torch.empty_like(query)
        decode_mask = plan.decode.mask if plan.decode is not None else None
        prefill_masks = [part.mask for part in plan.prefills]
        if sliding_window is not None:
            decode_mask, prefill_masks = self._window_masks(plan, sliding_window, query.device)
        if plan.decode is not None:
            group = plan.decode
            keys, values = meta.kv_cache.read(layer, group.slots)  # [B, L, kv_heads, D]
            if sinks is None:
                attended = decode_sdpa(query[group.rows], keys, values, decode_mask, scaling)
            else:
                k, v = (t.transpose(1, 2) for t in (keys, values))
                attended = sink_attention(query[group.rows].unsqueeze(2), k, v, decode_mask, sinks, scaling)[:, :, 0]
            out[group.rows] = attended.to(out.dtype)
        for part, mask in zip(plan.prefills, prefill_masks):
            rows = slice(part.start, part.start + part.length)
            if part.slots is None:
                k, v = key[rows], value[rows]
            else:
                k, v = meta.kv_cache.read(layer, part.slots)
            q = query[rows].transpose(0, 1).unsqueeze(0)
            k, v = (t.transpose(0, 1).unsqueeze(0) for t in (k, v))
            if sinks is None:
                attended = _sdpa(q, k, v, mask, mask is None, scaling)
            else:
                if mask is None:
                    mask = torch.ones(part.length, part.length, dtype=torch.bool, device=q.device).tril()
                attended = sink_attention(q, k, v, mask, sinks, scaling)
            out[rows] = attended[0].transpose(0, 1).to(out.dtype)
        return out


def decode_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """One query row per sequence: [B, heads, D] over [B, L, kv_heads, D] -> [B, heads, D].

    The query heads that share a key/value head become that head's query rows (head h reads
    kv head h // groups), so grouped-query attention needs neither expanded keys nor GQA
    support; the padding mask [B, 1, 1, L] applies to every row alike.
    """
    batch, heads, dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.view(batch, kv_heads, heads // kv_heads, dim)
    k, v = (t.transpose(1, 2).to(q.dtype) for t in (k, v))
    attended = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scaling)
    return attended.reshape(batch, heads, dim)


def sink_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, sinks: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention with one sink logit per head: [B, heads, Lq, D] x [B, kv_heads, Lk, D] -> [B, heads, Lq, D].
    `mask` (True = attend) broadcasts to [B, heads, Lq, Lk]."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.to(q.dtype).repeat_interleave(groups, dim=1) for t in (k, v))
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    logits = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.matmul(probs, v)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scaling: float
) -> torch.Tensor:
    """SDPA on [B, heads, Lq, D] x [B, kv_heads, Lk, D]. On CUDA, grouped-query heads are expanded
    when a mask is given: masked GQA there would fall back to the slow math kernel."""
    groups = q.shape[1] // k.shape[1]
    expand = groups > 1 and mask is not None and q.device.type == "cuda"
    if expand:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=is_causal, scale=scaling,
        enable_gqa=groups > 1 and not expand,
    )


def _pad(slots: torch.Tensor, length: int) -> torch.Tensor:
    """`slots` padded to `length` with its first slot (always written, so never uninitialised memory)."""
    if slots.numel() == length:
        return slots
    return torch.cat([slots, slots[:1].expand(length - slots.numel())])
