"""Bench models and setups: the 8B-size random model has InternVL3.5-8B's shapes, models can be
generated in bfloat16, and the bench's device options reach each server's config."""

from __future__ import annotations

import torch
from transformers import InternVLForConditionalGeneration

from benchmarks.setups import BASE_CONFIG, Setup
from benchmarks.models import QWEN3_8B, VIT_300M
from pipeline.config import load_config
from pipeline.model.tiny_weights import build_model, internvl_config


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_8b_bench_model_has_the_size_of_internvl3_5_8b() -> None:
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(internvl_config(VIT_300M, QWEN3_8B))
    # InternViT-300M (0.30B) + projector + Qwen3-8B (8.19B; here with the tokenizer's 151,675 rows
    # instead of the released 151,936).
    assert 0.29e9 < _parameters(model.model.vision_tower) < 0.31e9
    assert 8.15e9 < _parameters(model.model.language_model) + _parameters(model.lm_head) < 8.25e9
    assert 8.45e9 < _parameters(model) < 8.6e9
    layer = model.model.language_model.layers[0].self_attn
    assert (layer.q_proj.out_features, layer.k_proj.out_features) == (32 * 128, 8 * 128)


def test_a_bfloat16_model_holds_the_float32_draws_rounded() -> None:
    full = build_model()
    half = build_model(dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32
    full_params = dict(full.named_parameters())
    for name, param in half.named_parameters():
        assert param.dtype == torch.bfloat16, name
        assert torch.equal(param, full_params[name].to(torch.bfloat16)), name


def test_setup_devices_reach_each_servers_config() -> None:
    setup = Setup("dvd", "decoupled", 1, 2, vision_device="cuda:1", llm_device="cuda:0")
    config = load_config(BASE_CONFIG, setup.overrides("/models/any", "bfloat16", 64, kv_blocks=4128, max_num_seqs=8))
    assert (config.vision.device, config.language.device) == ("cuda:1", "cuda:0")
    assert (config.language.num_kv_blocks, config.language.max_num_seqs) == (4128, 8)
    assert (config.vision.threads, config.language.threads) == (1, 2)
    assert (config.vision.dtype, config.language.dtype, config.vision.max_batch_tiles) == ("bfloat16", "bfloat16", 64)
    cpu = load_config(BASE_CONFIG, Setup("colocated-b", "colocated", 0, 2).overrides("/models/any", "float32", 1, 600, 8))
    assert (cpu.mode, cpu.vision.device, cpu.language.device) == ("colocated", "cpu", "cpu")


def test_a_vllm_engine_setup_binds_vllm_to_its_cpus_and_leaves_its_threads_to_them() -> None:
    setup = Setup("dvd-vllm", "decoupled", 1, 1, vision_cpus=(0,), llm_cpus=(1,), engine="vllm", kv_cache_gib=2)
    config = load_config(BASE_CONFIG, setup.overrides("/models/any", "float32", 1, kv_blocks=2064, max_num_seqs=8))
    assert (config.language.engine, config.language.cpus, config.language.threads) == ("vllm", (1,), 0)
    assert (config.vision.cpus, config.vision.threads, config.vllm.cpu_kv_cache_gib) == ((0,), 1, 2.0)
    assert config.vllm.threads_bind(config.language.cpus) == "1" and config.language.max_num_seqs == 8
