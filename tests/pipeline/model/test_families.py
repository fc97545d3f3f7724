"""The generated family checkpoints carry their family's flags, names and tokens on disk (what
tests/e2e/test_families.py then serves), and `python -m pipeline tiny --family` prints where."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from pipeline.entrypoints.cli import main
from pipeline.model.checkpoint import open_checkpoint
from pipeline.model.families import FAMILIES, family_dir


def _names(directory) -> list[str]:
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("family", ["internvl3_5-241b-a28b", "internvl3-9b", "internvl3-dense"])
def test_a_family_checkpoint_is_what_its_published_checkpoints_are(family):
    root = family_dir(family)
    original = json.loads((root / "original" / "config.json").read_text())
    hf = open_checkpoint(root / "hf")
    if family == "internvl3_5-241b-a28b":  # InternViT-6B + Qwen3-MoE, experts stored one by one
        assert original["vision_config"]["qk_normalization"] and original["vision_config"]["norm_type"] == "rms_norm"
        assert not original["vision_config"]["qkv_bias"]
        assert any(".vision_model.encoder.layers.0.attn.q_norm." in "." + n for n in _names(root / "original"))
        assert any(".mlp.experts.3.gate_proj.weight" in n for n in _names(root / "original"))
        assert (root / "flash" / "config.json").exists()
    if family == "internvl3-9b":  # InternLM3 with its own vocabulary and InternVL3's system turn
        assert original["llm_config"]["model_type"] == "internlm3" and hf.text_config.model_type == "llama"
        assert open_checkpoint(root / "original").text_config.rope_parameters["rope_type"] == "dynamic"
        tokenizer = AutoTokenizer.from_pretrained(root / "original")
        assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<IMG_CONTEXT>"]) == [92542, 92546]
        assert original["img_context_token_id"] == hf.internvl_config.image_token_id == 92546
    if family == "internvl3-dense":  # Qwen2.5 with tied embeddings: no lm_head stored
        assert hf.text_config.tie_word_embeddings
        assert not [n for n in _names(root / "original") if "lm_head" in n]
    rendered = AutoTokenizer.from_pretrained(root / "hf").apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert rendered.startswith("<|im_start|>system\n你是书生·万象") == family.startswith("internvl3-")


def test_the_cli_prints_a_family_s_directories(capsys):
    assert main(["tiny", "--family", "internvl3-9b"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(family_dir("internvl3-9b") / fmt) for fmt in FAMILIES["internvl3-9b"].formats]
    assert main(["tiny", "--family", "internvl4"]) == 2
    assert "unknown family 'internvl4'" in capsys.readouterr().err
