"""Mixture-of-experts checkpoints as they lie on disk (one tensor per expert) load into the
servers' modules exactly as transformers loads them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration

from language_server.model import LanguageModel
from pipeline.model.checkpoint import CheckpointError, open_checkpoint
from pipeline.model.checkpoint_names import hf_to_original
from pipeline.model.expert_fusion import fuse_experts
from pipeline.model.tiny_model import random_model_dir
from pipeline.model.tiny_weights import TEXT_CONFIG

EXPERTS = 4
QWEN3_MOE = {
    **TEXT_CONFIG, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": EXPERTS,
    "num_experts_per_tok": 2, "moe_intermediate_size": 48, "decoder_sparse_step": 1, "norm_topk_prob": True,
}


def test_per_expert_tensors_stack_into_the_fused_layout() -> None:
    gate = [torch.full((3, 2), float(e)) for e in range(EXPERTS)]
    up = [torch.full((3, 2), 10.0 + e) for e in range(EXPERTS)]
    down = [torch.full((2, 3), 20.0 + e) for e in range(EXPERTS)]
    prefix = "model.layers.0.mlp.experts."
    tensors = {"model.norm.weight": torch.ones(2)}
    for e in range(EXPERTS):
        tensors |= {f"{prefix}{e}.gate_proj.weight": gate[e], f"{prefix}{e}.up_proj.weight": up[e],
                    f"{prefix}{e}.down_proj.weight": down[e]}
    fused = fuse_experts(tensors, {"model.norm.weight", prefix + "gate_up_proj", prefix + "down_proj"})
    assert sorted(fused) == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj",
                             "model.norm.weight"]
    assert fused[prefix + "gate_up_proj"].shape == (EXPERTS, 6, 2)
    assert torch.equal(fused[prefix + "gate_up_proj"][2], torch.cat([gate[2], up[2]]))
    assert torch.equal(fused[prefix + "down_proj"][3], down[3])
    untouched = fuse_experts(tensors, set(tensors))  # a module that keeps one module per expert
    assert untouched is tensors
    del tensors[f"{prefix}1.down_proj.weight"]
    with pytest.raises(ValueError, match=r"down_proj: experts \[1\] are missing"):
        fuse_experts(tensors, {prefix + "gate_up_proj", prefix + "down_proj"})


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """A random InternVL with a Qwen3-MoE LLM: HF-native as save_pretrained writes it, and the
    original format renamed from those very files (per-expert tensors in both)."""
    root = random_model_dir("test-internvl-qwen3moe-v1", text_config=QWEN3_MOE, formats=("hf",))
    original = tmp_path_factory.mktemp("qwen3moe") / "original"
    original.mkdir()
    save_file(hf_to_original(load_file(root / "hf" / "model.safetensors")), original / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((root / "hf" / "config.json").read_text())
    (original / "config.json").write_text(json.dumps(_original_config(config)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (root / "hf" / name).exists():
            shutil.copy(root / "hf" / name, original / name)
    return {"hf": root / "hf", "original": original}


def _original_config(hf: dict) -> dict:
    text = hf["text_config"]
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
            "force_image_size": 448, "select_layer": -1, "ps_version": "v2", "template": "internvl2_5",
            "max_dynamic_patch": 12, "use_thumbnail": True,
            "vision_config": {**hf["vision_config"], "architectures": ["InternVisionModel"]},
            "llm_config": {**text, "architectures": ["Qwen3MoeForCausalLM"]}}


@pytest.mark.parametrize("fmt", ["hf", "original"])
def test_a_qwen3_moe_checkpoint_from_disk_gives_transformers_logits(moe_dirs, fmt) -> None:
    on_disk = load_file(moe_dirs[fmt] / "model.safetensors")
    assert any(".experts.0.gate_proj.weight" in name for name in on_disk)  # stored per expert
    model, _ = LanguageModel.from_checkpoint(open_checkpoint(moe_dirs[fmt]), "cpu", torch.float32)
    reference = InternVLForConditionalGeneration.from_pretrained(moe_dirs["hf"], dtype=torch.float32).eval()
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = model.causal_lm(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_expert_missing_on_disk_is_named(moe_dirs, tmp_path) -> None:
    broken = tmp_path / "hf"
    shutil.copytree(moe_dirs["hf"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["language_model.model.layers.1.mlp.experts.2.up_proj.weight"]  # the names save_pretrained writes
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.\*\.up_proj: experts \[2\] are missing"):
        LanguageModel.from_checkpoint(open_checkpoint(broken), "cpu", torch.float32)
