"""ViR, the visual resolution router of InternVL3.5-Flash (see docs/vir.md).

Each tile's ViT grid is pooled by cross-attention, scored by a small gating MLP, and the
tiles of one job (an image, or all frames of a video) whose score clears both the job's
quantile and an absolute threshold are compressed from 256 to 64 tokens (pixel shuffle
0.25 followed by `mlp2`). Taking the quantile per job keeps a job's features independent of
the other jobs in its batch; the released code pools it over all images of one `generate`
call, which is the same for single-image requests.

The module layouts mirror the released checkpoints' `nn.Sequential` indices, so their
`state_dict()` keys are exactly the original-format names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.model.checkpoint import Checkpoint, CheckpointError, materialize

TokenMode = Literal["router", "all_256", "all_64"]
POOLING_HEADS = 16


def build_mlp2(vit_hidden: int, llm_hidden: int) -> nn.Sequential:
    """The 64-token projector: LayerNorm(16C) -> Linear(16C, 2H) -> GELU -> Linear(2H, 2H) -> GELU -> Linear(2H, H)."""
    wide = vit_hidden * 16
    return nn.Sequential(
        nn.LayerNorm(wide),
        nn.Linear(wide, llm_hidden * 2),
        nn.GELU(),
        nn.Dropout(0.0),
        nn.Linear(llm_hidden * 2, llm_hidden * 2),
        nn.GELU(),
        nn.Dropout(0.0),
        nn.Linear(llm_hidden * 2, llm_hidden),
    )


class CrossAttentionPooling(nn.Module):
    """One learned query attends over a tile's tokens; [T, N, C] -> [T, C].

    Four attention layers exist in the checkpoints; the released forward pass applies
    attn1/norm1 once, then attn2/norm2 three times, and never touches attn3/attn4.
    """

    def __init__(self, dim: int, heads: int = POOLING_HEADS) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, dim))
        for i in range(1, 5):
            setattr(self, f"attn{i}", nn.MultiheadAttention(dim, heads, batch_first=True))
            setattr(self, f"norm{i}", nn.LayerNorm(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.query_token.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        pooled = self.norm1(self.attn1(query, tokens, tokens)[0])
        for _ in range(3):
            pooled = self.norm2(self.attn2(pooled, tokens, tokens)[0])
        return pooled.squeeze(1)


def _gating_block(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, dim * 4), nn.GELU(), nn.Dropout(0.0), nn.Linear(dim * 4, dim), nn.Dropout(0.0), nn.LayerNorm(dim)
    )


class Gating(nn.Module):
    """Four residual MLP blocks and a two-way gate; [T, C] -> probabilities [T, 2]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block1, self.block2, self.block3, self.block4 = (_gating_block(dim) for _ in range(4))
        self.gate = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled
        for block in (self.block1, self.block2, self.block3, self.block4):
            x = x + block(x)
        return torch.softmax(self.gate(x), dim=-1)


class VirModules(nn.Module):
    """The Flash-only modules under their checkpoint names: mlp2, pooling_before_gating, gating."""

    def __init__(self, vit_hidden: int, llm_hidden: int) -> None:
        super().__init__()
        self.mlp2 = build_mlp2(vit_hidden, llm_hidden)
        self.pooling_before_gating = CrossAttentionPooling(vit_hidden)
        self.gating = Gating(vit_hidden)


@dataclass(frozen=True)
class Thresholds:
    """The checkpoint's routing thresholds (`flash_relative_threshold`, `flash_absolute_threshold`)."""

    relative: float
    absolute: float


def compress_decisions(scores: torch.Tensor, thresholds: Thresholds) -> list[bool]:
    """Which tiles of one job are compressed to 64 tokens, from each tile's first gate probability.

    A tile is compressed when its score exceeds the job's `relative` quantile of scores
    (torch.quantile in float32) and is at least `absolute`.
    """
    scores = scores.float().reshape(-1)
    cut = torch.quantile(scores, thresholds.relative)
    return ((scores > cut) & (scores >= thresholds.absolute)).tolist()


def compressed_tiles(mode: TokenMode, scores: torch.Tensor | None, thresholds: Thresholds | None, tiles: int) -> list[bool]:
    """Which tiles of one job are compressed to 64 tokens under a routing mode."""
    if mode == "all_256":
        return [False] * tiles
    if mode == "all_64":
        return [True] * tiles
    if scores is None or thresholds is None:
        raise ValueError("router mode needs gate scores and thresholds")
    return compress_decisions(scores, thresholds)


class VisualResolutionRouter(nn.Module):
    """Scores tiles and projects compressed ones, from the ViT grid [T, g, g, C]."""

    def __init__(self, modules: VirModules, thresholds: Thresholds) -> None:
        super().__init__()
        self.flash = modules
        self.thresholds = thresholds

    @torch.inference_mode()
    def scores(self, grid: torch.Tensor) -> torch.Tensor:
        """The first gate probability of every tile: [T]."""
        tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        return self.flash.gating(self.flash.pooling_before_gating(tokens))[:, 0]

    @torch.inference_mode()
    def project_compressed(self, shuffled: torch.Tensor) -> torch.Tensor:
        """mlp2 on the 0.25-shuffled grid [T, 8, 8, 16C] -> [T, 64, H]."""
        return self.flash.mlp2(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, device: str | torch.device, dtype: torch.dtype
    ) -> tuple[VisualResolutionRouter, list[str]]:
        """Load the Flash modules of an original-format checkpoint; returns the router and the names read."""
        raw = checkpoint.raw_config
        if "flash_relative_threshold" not in raw or "flash_absolute_threshold" not in raw:
            raise CheckpointError(f"{checkpoint.path}: a Flash checkpoint needs flash_*_threshold in config.json")
        part = checkpoint.read_part("vir")
        vit_hidden = checkpoint.vision_config.hidden_size
        llm_hidden = checkpoint.text_config.hidden_size
        modules = materialize(lambda: VirModules(vit_hidden, llm_hidden), part.tensors, device, dtype)
        thresholds = Thresholds(float(raw["flash_relative_threshold"]), float(raw["flash_absolute_threshold"]))
        return cls(modules, thresholds).eval(), sorted(part.source_names)
