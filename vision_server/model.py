"""The vision half of InternVL: InternViT, pixel shuffle and the MLP projector."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector, InternVLVisionModel

from pipeline.model.checkpoint import Checkpoint, materialize


def pixel_shuffle(features: torch.Tensor, scale: float) -> torch.Tensor:
    """InternVL's "v2" pixel shuffle: [n, w, h, c] -> [n, h*s, w*s, c/s^2] with axes restored."""
    n, w, h, c = features.shape
    features = features.reshape(n, w, int(h * scale), int(c / scale))
    features = features.permute(0, 2, 1, 3).contiguous()
    features = features.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return features.permute(0, 2, 1, 3).contiguous()


class VisionEncoder(nn.Module):
    """Tiles [T, 3, S, S] -> LLM-space features [T, tokens_per_tile, llm_hidden]."""

    def __init__(self, vision_tower: InternVLVisionModel, projector: InternVLMultiModalProjector, scale: float):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.downsample_ratio = scale

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.linear_1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.projector.linear_1.weight.device

    def vit_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the last ViT layer, CLS dropped, as a [T, g, g, C] grid."""
        hidden = self.vision_tower(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state
        hidden = hidden[:, 1:, :]
        side = int(hidden.shape[1] ** 0.5)
        return hidden.reshape(hidden.shape[0], side, side, -1)

    def project_full(self, grid: torch.Tensor) -> torch.Tensor:
        """The ordinary path: pixel shuffle (downsample_ratio) and mlp1; [T, g, g, C] -> [T, tokens, H]."""
        shuffled = pixel_shuffle(grid, self.downsample_ratio)
        return self.projector(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project_full(self.vit_grid(pixel_values))

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, device: str | torch.device, dtype: torch.dtype
    ) -> tuple[VisionEncoder, list[str]]:
        """Load only the ViT and projector tensors; returns the encoder and the names read."""
        config = checkpoint.internvl_config
        config.vision_config._attn_implementation = "sdpa"
        vision = checkpoint.read_part("vision")
        projector = checkpoint.read_part("projector")
        tower = materialize(lambda: InternVLVisionModel(config.vision_config), vision.tensors, device, dtype)
        proj = materialize(lambda: InternVLMultiModalProjector(config), projector.tensors, device, dtype)
        encoder = cls(tower, proj, checkpoint.downsample_ratio).eval()
        return encoder, sorted(vision.source_names + projector.source_names)
