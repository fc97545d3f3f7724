"""The Flash variant of the tiny model: the InternVL3.5-Flash modules added to its original format.

InternVL3.5-Flash checkpoints add the ViR router (`pooling_before_gating`, `gating`) and the
64-token projector (`mlp2`) to the original format, and set `flash_mode` with its two
thresholds in config.json (docs/vir.md). The tensors are named and shaped here from
the spec, independently of the vision server's modules, so that tests can check one against
the other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

# ViR thresholds of the tiny Flash model: compress the tiles scoring above a job's median.
FLASH_RELATIVE_THRESHOLD = 0.5
FLASH_ABSOLUTE_THRESHOLD = 0.3


def write_flash(directory: Path, original_tensors: dict[str, torch.Tensor], original_config: dict[str, Any],
                tokenizer: Any, seed: int = 0) -> None:
    """Write an original-format Flash checkpoint: the given model's tensors plus the Flash ones."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    vit_hidden = original_config["vision_config"]["hidden_size"]
    llm_hidden = original_config["llm_config"]["hidden_size"]
    tensors = {**original_tensors, **flash_tensors(vit_hidden, llm_hidden, seed)}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)
    config = {
        **original_config,
        "flash_mode": True,
        "flash_relative_threshold": FLASH_RELATIVE_THRESHOLD,
        "flash_absolute_threshold": FLASH_ABSOLUTE_THRESHOLD,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def flash_tensor_shapes(vit_hidden: int, llm_hidden: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the Flash-only tensors in the original format (docs/vir.md)."""
    c, h = vit_hidden, llm_hidden
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        shapes[f"{name}.weight"] = (out_features, in_features)
        shapes[f"{name}.bias"] = (out_features,)

    def norm(name: str, dim: int) -> None:
        shapes[f"{name}.weight"] = (dim,)
        shapes[f"{name}.bias"] = (dim,)

    norm("mlp2.0", 16 * c)
    linear("mlp2.1", 2 * h, 16 * c)
    linear("mlp2.4", 2 * h, 2 * h)
    linear("mlp2.7", h, 2 * h)
    shapes["pooling_before_gating.query_token"] = (1, c)
    for i in range(1, 5):
        shapes[f"pooling_before_gating.attn{i}.in_proj_weight"] = (3 * c, c)
        shapes[f"pooling_before_gating.attn{i}.in_proj_bias"] = (3 * c,)
        linear(f"pooling_before_gating.attn{i}.out_proj", c, c)
        norm(f"pooling_before_gating.norm{i}", c)
    for i in range(1, 5):
        linear(f"gating.block{i}.0", 4 * c, c)
        linear(f"gating.block{i}.3", c, 4 * c)
        norm(f"gating.block{i}.5", c)
    norm("gating.gate.0", c)
    linear("gating.gate.1", 2, c)
    return shapes


def flash_tensors(vit_hidden: int, llm_hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic Flash weights: unit norms and 1/sqrt(fan_in) projections. Tile scores then
    spread around 0.4-0.9 on photos, so the median cut compresses about half of a photo's tiles."""
    generator = torch.Generator().manual_seed(seed + 1)
    shapes = flash_tensor_shapes(vit_hidden, llm_hidden)
    tensors = {}
    for name, shape in shapes.items():
        if _FLASH_NORM.match(name):
            value = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif name.endswith("query_token"):
            value = torch.randn(shape, generator=generator)
        elif name.endswith("bias"):
            value = torch.randn(shape, generator=generator) * 0.02
        else:
            fan_in = shape[1]
            value = torch.randn(shape, generator=generator) / fan_in**0.5
        tensors[name] = value.contiguous()
    tensors["gating.gate.1.bias"] = torch.zeros(2)
    return tensors


_FLASH_NORM = re.compile(r"^(mlp2\.0|pooling_before_gating\.norm\d|gating\.block\d\.5|gating\.gate\.0)\.")
