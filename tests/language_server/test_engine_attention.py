"""Paged attention over scattered KV blocks equals plain causal attention; the block pool accounts
for every block and is sized from the config."""

from __future__ import annotations

import math

import pytest
import torch

from language_server.engine.attention_metadata import AttentionMetadata
from language_server.engine.block_manager import BlockManager
from language_server.engine.flash_backend import FlashAttentionBackend
from language_server.engine.kv_cache import KVCache, KVCacheSpec, plan_num_blocks
from language_server.engine.sampling import SamplingParams
from language_server.engine.sdpa_backend import SdpaBackend
from language_server.engine.sequence import EngineRequest, Sequence
from pipeline.config import LanguageConfig

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 8, 4
# (cached prefix, new queries) per sequence: whole prompts, chunks after a prefix, decodes.
SHAPES = [(0, 7), (5, 1), (9, 6), (0, 1), (13, 1), (3, 4)]


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64, query i seeing keys 0 .. prefix + i; [n, H, D] out."""
    k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1).double() for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(DIM)
    allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + prefix
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


def _varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """flash-attn's varlen contract (packed rows, bottom-right causal), written with plain torch,
    standing in for the CUDA kernel so the backend's gathering and offsets can be checked here."""
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = (int(x) for x in (cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]))
        assert causal and qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
        out[qs:qe] = _dense_reference(q[qs:qe], k[ks:ke], v[ks:ke], (ke - ks) - (qe - qs)).to(q.dtype)
    return out


@pytest.mark.parametrize("backend", [SdpaBackend(), FlashAttentionBackend(varlen_kernel=_varlen_sdpa)], ids=["sdpa", "flash_plumbing"])
def test_paged_attention_equals_dense_causal_attention(backend):
    generator = torch.Generator().manual_seed(0)
    cache = KVCache(KVCacheSpec(1, KV_HEADS, DIM, torch.float32), num_blocks=64, block_size=BLOCK, device=torch.device("cpu"))
    free = torch.randperm(64, generator=generator).tolist()  # scattered, out-of-order blocks
    keys, values, tables = [], [], []
    for prefix, new in SHAPES:
        total = prefix + new
        tables.append([free.pop() for _ in range(-(-total // BLOCK))])
        keys.append(torch.randn(total, KV_HEADS, DIM, generator=generator))
        values.append(torch.randn(total, KV_HEADS, DIM, generator=generator))
    slots = [
        torch.tensor([table[t // BLOCK] * BLOCK + t % BLOCK for t in range(prefix + new)])
        for table, (prefix, new) in zip(tables, SHAPES)
    ]
    for slot, k, v, (prefix, _) in zip(slots, keys, values, SHAPES):
        cache.write(0, slot[:prefix], k[:prefix], v[:prefix])  # what earlier steps cached
    query_start = [0]
    for _, new in SHAPES:
        query_start.append(query_start[-1] + new)
    meta = AttentionMetadata(
        kv_cache=cache,
        backend=backend,
        slot_mapping=torch.cat([s[p:] for s, (p, _) in zip(slots, SHAPES)]),
        query_start=query_start,
        context_lens=[p + n for p, n in SHAPES],
        context_slots=slots,
    )
    meta.plan = backend.plan(meta)
    query = torch.randn(query_start[-1], HEADS, DIM, generator=generator)
    new_keys = torch.cat([k[p:] for k, (p, _) in zip(keys, SHAPES)])
    new_values = torch.cat([v[p:] for v, (p, _) in zip(values, SHAPES)])
    cache.write(0, meta.slot_mapping, new_keys, new_values)

    out = backend.attend(query, new_keys, new_values, 0, meta, DIM**-0.5)

    for i, (prefix, new) in enumerate(SHAPES):
        rows = slice(query_start[i], query_start[i + 1])
        expected = _dense_reference(query[rows], keys[i], values[i], prefix)
        torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=1e-5)


def _sequence(name: str) -> Sequence:
    return Sequence(EngineRequest(name, [1, 2, 3], SamplingParams()), tokenizer=None, max_model_len=100)


def test_block_manager_grows_tables_and_takes_every_block_back():
    blocks = BlockManager(num_blocks=5, block_size=4)
    a, b = _sequence("a"), _sequence("b")
    blocks.allocate(a, 5)  # 2 blocks
    blocks.allocate(a, 8)  # still 2
    assert len(a.block_table) == 2 and blocks.num_used == 2
    assert blocks.can_allocate(b, 12) and not blocks.can_allocate(b, 13)
    blocks.allocate(b, 12)
    assert blocks.num_free == 0 and blocks.usage == 1.0
    assert not blocks.can_allocate(a, 9) and blocks.can_allocate(a, 8)
    with pytest.raises(RuntimeError):
        blocks.allocate(a, 9)
    assert len(set(a.block_table) | set(b.block_table)) == 5
    blocks.free(a)
    blocks.free(b)
    assert blocks.num_used == 0 and a.block_table == [] and b.block_table == []


def test_pool_size_comes_from_num_kv_blocks_or_the_memory_fraction():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32)  # 512 bytes a token
    cpu = torch.device("cpu")
    assert plan_num_blocks(LanguageConfig(num_kv_blocks=123), spec, cpu) == 123
    # A fraction of free RAM (gigabytes here) buys more than max_num_seqs full-length sequences can use.
    config = LanguageConfig(max_num_seqs=4, max_model_len=1000, block_size=16, kv_cache_memory_fraction=0.5)
    assert plan_num_blocks(config, spec, cpu) == 4 * 63
    with pytest.raises(ValueError, match="kv_cache_memory_fraction"):
        plan_num_blocks(LanguageConfig(kv_cache_memory_fraction=1e-12), spec, cpu)
