"""Tensor names of InternVL checkpoints: which part a name belongs to, and renaming.

Checkpoints name tensors in one of two formats (see docs/checkpoints.md); the servers'
modules are transformers' own and use its names. `renamer(format, part)` maps a checkpoint's
names (and fused tensors) to module names; `hf_to_original` goes the other way, to write
original-format checkpoints.
"""

from __future__ import annotations

import re
from typing import Callable, Literal

import torch

Format = Literal["hf", "original"]
Part = Literal["vision", "projector", "llm", "vir"]
PARTS: tuple[Part, ...] = ("vision", "projector", "llm", "vir")


class CheckpointError(ValueError):
    """The directory is not an InternVL checkpoint this project can read."""


# Checkpoint name prefixes of each part, per format.
_PART_PREFIXES: dict[Format, dict[Part, tuple[str, ...]]] = {
    "hf": {
        "vision": ("model.vision_tower.", "vision_tower."),
        "projector": ("model.multi_modal_projector.", "multi_modal_projector."),
        "llm": ("model.language_model.", "language_model.", "lm_head."),
    },
    "original": {
        "vision": ("vision_model.",),
        "projector": ("mlp1.",),
        "llm": ("language_model.",),
        "vir": ("mlp2.", "pooling_before_gating.", "gating."),
    },
}


def part_of(format: Format, name: str) -> Part | None:
    """The part a checkpoint tensor belongs to, or None for tensors no server reads."""
    for part, prefixes in _PART_PREFIXES[format].items():
        if name.startswith(prefixes):
            return part
    return None


# Original-format ViT names and transformers InternVLVisionModel names (after "vision_model." and
# "model.vision_tower."), one table read both ways: "{n}" is a layer index; a name ending in "."
# is a prefix, any other a whole name.
_VIT_NAMES: list[tuple[str, str]] = [
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("encoder.layers.{n}.attn.proj.", "encoder.layer.{n}.attention.projection_layer."),
    ("encoder.layers.{n}.attn.q_norm.", "encoder.layer.{n}.attention.q_norm."),
    ("encoder.layers.{n}.attn.k_norm.", "encoder.layer.{n}.attention.k_norm."),
    ("encoder.layers.{n}.mlp.", "encoder.layer.{n}.mlp."),
    ("encoder.layers.{n}.norm1.", "encoder.layer.{n}.layernorm_before."),
    ("encoder.layers.{n}.norm2.", "encoder.layer.{n}.layernorm_after."),
    ("encoder.layers.{n}.ls1", "encoder.layer.{n}.lambda_1"),
    ("encoder.layers.{n}.ls2", "encoder.layer.{n}.lambda_2"),
]


def _vit_rules(source: int) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, replacement) pairs that rename from column `source` of _VIT_NAMES to the other."""
    rules = []
    for names in _VIT_NAMES:
        old, new = names[source], names[1 - source]
        pattern = r"(\d+)".join(re.escape(part) for part in old.split("{n}"))
        rules.append((re.compile(f"^{pattern}" + ("" if old.endswith(".") else "$")), new.replace("{n}", r"\1")))
    return rules


_ORIGINAL_TO_HF_VIT = _vit_rules(0)
_HF_TO_ORIGINAL_VIT = _vit_rules(1)

_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_PROJECTOR_ORIGINAL = {"mlp1.0.": "layer_norm.", "mlp1.1.": "linear_1.", "mlp1.3.": "linear_2."}


Renamer = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


def _prefixes(kind: str, *pairs: tuple[str, str]) -> Renamer:
    """A renamer that replaces the first matching (checkpoint prefix, module prefix) pair."""

    def rename(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        for prefix, target in pairs:
            if name.startswith(prefix):
                return [(target + name[len(prefix) :], tensor)]
        raise CheckpointError(f"unexpected {kind} tensor name {name!r}")

    return rename


def _strip(kind: str, prefixes: tuple[str, ...]) -> Renamer:
    return _prefixes(kind, *((prefix, "") for prefix in prefixes))


def _original_vision(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    inner = name[len("vision_model.") :]
    match = _QKV.match(inner)
    if match:
        layer, kind = match.groups()
        q, k, v = tensor.chunk(3, dim=0)
        return [(f"encoder.layer.{layer}.attention.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    for pattern, replacement in _ORIGINAL_TO_HF_VIT:
        renamed, count = pattern.subn(replacement, inner)
        if count:
            return [(renamed, tensor)]
    raise CheckpointError(f"unexpected vision tensor name {name!r}")


def _identity(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor)]


_RENAMERS: dict[tuple[Format, Part], Renamer] = {
    ("hf", "vision"): _strip("vision", _PART_PREFIXES["hf"]["vision"]),
    ("hf", "projector"): _strip("projector", _PART_PREFIXES["hf"]["projector"]),
    ("hf", "llm"): _prefixes(
        "LLM",
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("lm_head.", "lm_head."),
    ),
    ("hf", "vir"): _identity,
    ("original", "vision"): _original_vision,
    ("original", "projector"): _prefixes("projector", *_PROJECTOR_ORIGINAL.items()),
    ("original", "llm"): _prefixes(
        "LLM", ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")
    ),
    ("original", "vir"): _identity,
}


def hf_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF-native InternVL state dict (transformers 5.x module names, or the names
    `save_pretrained` writes) to the original format.

    The inverse of the loaders' renaming: q/k/v projections are fused into `attn.qkv`.
    """
    out: dict[str, torch.Tensor] = {}
    qkv = re.compile(r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            name = "model." + name
        elif name.startswith("language_model.model."):
            name = "model.language_model." + name[len("language_model.model.") :]
        if name.startswith("model.vision_tower."):
            inner = name[len("model.vision_tower.") :]
            match = qkv.match(inner)
            if match:
                layer, which, kind = match.groups()
                fused.setdefault((layer, kind), {})[which] = tensor
                continue
            for pattern, replacement in _HF_TO_ORIGINAL_VIT:
                renamed, count = pattern.subn(replacement, inner)
                if count:
                    out["vision_model." + renamed] = tensor
                    break
            else:
                raise CheckpointError(f"no original-format name for {name!r}")
        elif name.startswith("model.multi_modal_projector."):
            inner = name[len("model.multi_modal_projector.") :]
            for original, hf in _PROJECTOR_ORIGINAL.items():
                if inner.startswith(hf):
                    out[original + inner[len(hf) :]] = tensor
                    break
            else:
                raise CheckpointError(f"no original-format name for {name!r}")
        elif name.startswith("model.language_model."):
            out["language_model.model." + name[len("model.language_model.") :]] = tensor
        elif name.startswith("lm_head."):
            out["language_model." + name] = tensor
        else:
            out[name] = tensor
    for (layer, kind), parts in fused.items():
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in "qkv"], dim=0)
    return out


# InternLM2-style LLM names (`attention.wqkv` ...), as original InternVL checkpoints on InternLM carry
# them where the LLM's own code uses them, and transformers' llama names, which its InternVL
# conversion gives them. InternLM3's code (InternVL3-9B) already uses llama names.
_INTERNLM_NAMES = [
    ("language_model.output.", "language_model.lm_head."),
    (".tok_embeddings.", ".embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
]


def _internlm_llm(text_config, then: Renamer) -> Renamer:  # noqa: ANN001 - a transformers text config
    """Renames InternLM2-style names to llama names (splitting `wqkv`, stored per key-value group as
    [q x groups, k, v]), then applies `then`."""

    def rename(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if ".attention.wqkv." in name:
            kv_heads = text_config.num_key_value_heads
            groups = text_config.num_attention_heads // kv_heads
            head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
            grouped = tensor.reshape(kv_heads, groups + 2, head_dim, *tensor.shape[1:])
            parts = {
                "q_proj": grouped[:, :groups], "k_proj": grouped[:, groups], "v_proj": grouped[:, groups + 1],
            }
            out = []
            for proj, value in parts.items():
                target = name.replace(".attention.wqkv.", f".self_attn.{proj}.")
                out += then(target, value.reshape(-1, *tensor.shape[1:]).contiguous())
            return out
        for old, new in _INTERNLM_NAMES:
            if old in name:
                name = name.replace(old, new)
                break
        return then(name, tensor)

    return rename


def internlm_llm_names(text_config) -> Renamer:  # noqa: ANN001 - a transformers text config
    """Original-format names with InternLM2-style LLM names renamed to llama ones; others unchanged."""
    return _internlm_llm(text_config, _identity)


def renamer(format: Format, part: Part, text_config=None) -> Renamer:  # noqa: ANN001 - a transformers text config
    """Maps one checkpoint tensor of `part` to (module name, tensor) pairs (`text_config`: the LLM's,
    needed for original-format LLM tensors with InternLM2-style names)."""
    if (format, part) == ("original", "llm") and text_config is not None:
        return _internlm_llm(text_config, _RENAMERS[(format, part)])
    return _RENAMERS[(format, part)]
