"""Original-format checkpoints whose LLM carries InternLM2-style names (`attention.wqkv` fused per
key-value group, `tok_embeddings`, `attention.wo`, `feed_forward.w1/w2/w3`, `attention_norm`,
`ffn_norm`, `output`) load, from disk, into exactly the tensors of the same checkpoint with the
llama names that InternLM3's code (InternVL3-9B) and transformers' conversion use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from language_server.model import LanguageModel
from pipeline.model.checkpoint import open_checkpoint
from pipeline.model.families import family_dir
from tests.conftest import FP32, TINY_CONFIG, VLLM_ENGINE, port_overrides, requires_vllm

LLAMA_TO_INTERNLM = {
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "embed_tokens": "tok_embeddings",
}


def _internlm_named(tensors: dict[str, torch.Tensor], llm: dict) -> dict[str, torch.Tensor]:
    """The LLM tensors renamed the InternLM2 way; q, k, v fused into wqkv as [q x groups, k, v] per kv head."""
    kv_heads, head_dim = llm["num_key_value_heads"], llm["head_dim"]
    groups = llm["num_attention_heads"] // kv_heads
    out = {}
    for name, tensor in tensors.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            q, k, v = (tensors[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj"))
            hidden = q.shape[1]
            fused = torch.cat([q.reshape(kv_heads, groups, head_dim, hidden), k.reshape(kv_heads, 1, head_dim, hidden),
                               v.reshape(kv_heads, 1, head_dim, hidden)], dim=1)
            out[name.replace("self_attn.q_proj", "attention.wqkv")] = fused.reshape(-1, hidden).contiguous()
            continue
        for old, new in LLAMA_TO_INTERNLM.items():
            name = name.replace(f".{old}.", f".{new}.")
        out[name.replace("language_model.lm_head.", "language_model.output.")] = tensor
    return out


@pytest.fixture(scope="module")
def internlm_dir(tmp_path_factory):
    source = family_dir("internvl3-9b") / "original"
    target = tmp_path_factory.mktemp("internlm2-names")
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, target / file.name)
    config = json.loads((source / "config.json").read_text())
    save_file(_internlm_named(load_file(source / "model.safetensors"), config["llm_config"]),
              target / "model.safetensors", metadata={"format": "pt"})
    return source, target


def test_internlm2_names_load_the_same_llm(internlm_dir):
    source, target = internlm_dir
    stored = load_file(target / "model.safetensors")
    assert any(".attention.wqkv." in n for n in stored) and "language_model.output.weight" in stored
    assert not any(".self_attn." in n for n in stored)
    llama, names = LanguageModel.from_checkpoint(open_checkpoint(source), "cpu", torch.float32)
    internlm, internlm_names = LanguageModel.from_checkpoint(open_checkpoint(target), "cpu", torch.float32)
    expected, got = llama.state_dict(), internlm.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert len(internlm_names) < len(names)  # wqkv: one tensor read where llama names store three


@requires_vllm
def test_internlm2_names_serve_transformers_tokens_on_vllm(internlm_dir, tmp_path):
    from pipeline.entrypoints.launch import Deployment
    from tests.e2e.test_families import answers, reference_tokens

    overrides = {**port_overrides(), **FP32, **VLLM_ENGINE, "model.path": str(internlm_dir[1])}
    with Deployment(TINY_CONFIG, overrides, log_dir=tmp_path) as deployment:
        assert answers(deployment) == reference_tokens("internvl3-9b")
