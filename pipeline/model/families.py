"""The published InternVL3 and InternVL3.5 families, as random checkpoints at tiny widths.

A family is one vision tower (InternViT-300M or InternViT-6B) with one LLM architecture, and the
tokenizer, chat template and checkpoint conventions that go with them. Each generated checkpoint
carries its family's real configuration flags, layer types and tensor names, in both formats
(and, for InternVL3.5, the -Flash variant with the ViR router); only the widths are tiny and the
weights random. `family_dir(name)` generates one on first use into the cache (never into git).
See docs/checkpoints.md for the family table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.model.tiny_processors import (
    CHAT_TEMPLATE, INTERNLM_VOCAB_SIZE, INTERNVL3_CHAT_TEMPLATE, VOCAB_SIZE, build_tokenizer,
)
from pipeline.model.tiny_weights import TEXT_CONFIG, VISION_CONFIG

FAMILY_VERSION = 1

VIT_300M = VISION_CONFIG
# InternViT-6B's flags: RMSNorm, q/k normalisation over all heads, no q/k/v bias.
VIT_6B = {**VISION_CONFIG, "norm_type": "rms_norm", "use_qk_norm": True, "attention_bias": False}

_QWEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
QWEN3 = TEXT_CONFIG
QWEN2 = {
    **{k: v for k, v in TEXT_CONFIG.items() if k not in ("head_dim",)}, "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 2, "num_key_value_heads": 1,
    "use_sliding_window": False,
}  # head_dim = hidden / heads = 32 (Qwen2 has no head_dim of its own)
QWEN3_MOE = {
    **TEXT_CONFIG, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
    "num_experts_per_tok": 2, "moe_intermediate_size": 48, "decoder_sparse_step": 1, "norm_topk_prob": True,
    "mlp_only_layers": [],
}
# InternLM3 as transformers runs it: a llama-type model (InternLM3's modules carry Llama's names).
INTERNLM3_ROPE = {"rope_type": "dynamic", "factor": 6.0, "rope_theta": 50000000.0}
INTERNLM3_AS_LLAMA = {
    **{k: v for k, v in TEXT_CONFIG.items() if k not in _QWEN_IDS}, "model_type": "llama",
    "architectures": ["LlamaForCausalLM"], "vocab_size": INTERNLM_VOCAB_SIZE, "attention_bias": False,
    "mlp_bias": False, "rope_parameters": INTERNLM3_ROPE, "bos_token_id": 1, "eos_token_id": 92542,
    "pad_token_id": 2,
}
GPT_OSS = {
    **{k: v for k, v in TEXT_CONFIG.items() if k not in ("rope_parameters",)}, "model_type": "gpt_oss",
    "architectures": ["GptOssForCausalLM"], "intermediate_size": 64, "num_local_experts": 4,
    "num_experts_per_tok": 2, "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"],
    "attention_bias": True, "max_position_embeddings": 131072,
}


@dataclass(frozen=True)
class Family:
    """One published family: what its checkpoints are made of, at tiny widths."""

    name: str
    models: tuple[str, ...]  # the published checkpoints it stands for (each also -HF, -Instruct, ...)
    vision_tower: str  # "InternViT-300M" or "InternViT-6B"
    vision_config: dict[str, Any]
    text_config: dict[str, Any]
    vocabulary: str = "qwen"  # tiny_processors.build_tokenizer's vocabularies
    real_vocabulary: bool = True  # False: a stand-in (no registry package ships the real one)
    chat_template: str = CHAT_TEMPLATE
    flash: bool = False  # InternVL3.5: a -Flash variant with the ViR router exists
    original_llm: dict[str, Any] = field(default_factory=dict)  # llm_config keys of the original format

    @property
    def llm_class(self) -> str:
        return self.text_config["architectures"][0]

    @property
    def formats(self) -> tuple[str, ...]:
        return ("hf", "original", "flash") if self.flash else ("hf", "original")

    def tokenizer(self):  # noqa: ANN201 - a transformers tokenizer
        return build_tokenizer(self.vocabulary, self.chat_template)

    def original_llm_config(self, text_config: dict[str, Any]) -> dict[str, Any]:
        """The original format's `llm_config` for the LLM whose transformers config is `text_config`."""
        if not self.original_llm:
            return text_config
        kept = {k: v for k, v in text_config.items() if k not in ("rope_parameters", "attention_bias", "mlp_bias")}
        return {**kept, **self.original_llm}


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("internvl3_5-dense", ("InternVL3.5-1B", "2B", "4B", "8B", "14B"), "InternViT-300M", VIT_300M, QWEN3,
               flash=True),
        Family("internvl3_5-38b", ("InternVL3.5-38B",), "InternViT-6B", VIT_6B, QWEN3, flash=True),
        Family("internvl3_5-30b-a3b", ("InternVL3.5-30B-A3B",), "InternViT-300M", VIT_300M, QWEN3_MOE, flash=True),
        Family("internvl3_5-241b-a28b", ("InternVL3.5-241B-A28B",), "InternViT-6B", VIT_6B, QWEN3_MOE, flash=True),
        Family("internvl3_5-20b-a4b", ("InternVL3.5-20B-A4B",), "InternViT-300M", VIT_300M, GPT_OSS,
               real_vocabulary=False),
        Family("internvl3-dense", ("InternVL3-1B", "2B", "8B", "14B"), "InternViT-300M", VIT_300M,
               {**QWEN2, "tie_word_embeddings": True}, chat_template=INTERNVL3_CHAT_TEMPLATE),
        Family("internvl3-38b-78b", ("InternVL3-38B", "78B"), "InternViT-6B", VIT_6B, QWEN2,
               chat_template=INTERNVL3_CHAT_TEMPLATE),
        Family("internvl3-9b", ("InternVL3-9B",), "InternViT-300M", VIT_300M, INTERNLM3_AS_LLAMA,
               vocabulary="internlm", real_vocabulary=False, chat_template=INTERNVL3_CHAT_TEMPLATE,
               original_llm={"model_type": "internlm3", "architectures": ["InternLM3ForCausalLM"], "qkv_bias": False,
                             "bias": False, "rope_theta": INTERNLM3_ROPE["rope_theta"],
                             "rope_scaling": {"rope_type": "dynamic", "factor": 6.0}}),
    )
}
assert all(f.text_config["vocab_size"] in (VOCAB_SIZE, INTERNLM_VOCAB_SIZE) for f in FAMILIES.values())


# The embedded tiny model (pipeline/model/tiny_model.py) is this family's checkpoint.
TINY_FAMILY = "internvl3_5-dense"


def family_dir(name: str) -> Path:
    """The generated checkpoints of one family: `<dir>/hf`, `<dir>/original` (and `<dir>/flash`)."""
    from pipeline.model.tiny_model import random_model_dir, tiny_model_dir

    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; families: {', '.join(FAMILIES)}")
    if name == TINY_FAMILY:
        return tiny_model_dir("hf").parent
    family = FAMILIES[name]
    return random_model_dir(
        f"family-{name}-v{FAMILY_VERSION}", family.vision_config, family.text_config, family.formats,
        tokenizer=family.tokenizer, original_llm=family.original_llm_config,
    )
