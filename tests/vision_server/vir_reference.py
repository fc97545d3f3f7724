"""An independent, literal re-statement of the released InternVL3.5-Flash algorithm (test oracle).

It follows the released model code step by step, in one process: ViT features of every tile,
the router (padded token lists, attn1/norm1 once then attn2/norm2 three times, residual gating
blocks, softmax), the quantile and absolute thresholds over all tiles of the call, both
projections for every tile, a prompt with 256 <IMG_CONTEXT> per tile from which positions
64..255 of each compressed tile's block are deleted, and generation from the embeddings.
Nothing here imports the vision server.

The quantile is taken over all tiles of one `generate` call, i.e. over every image of a
request, as released and as DvD does. `quantile_per_image=True` takes it per image instead,
only so that tests can show a case in which the two scopes decide differently.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tests.reference import Reference

IMG_CONTEXT_ID = 151667


def flash_tensors(flash_dir: Path) -> dict[str, torch.Tensor]:
    """The Flash-only tensors (mlp2, pooling_before_gating, gating) of an original-format checkpoint."""
    prefixes = ("mlp2.", "pooling_before_gating.", "gating.")
    with safe_open(flash_dir / "model.safetensors", framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefixes)}


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


class ReleasedFlash:
    """The released Flash forward pass on top of transformers' InternVL (float32)."""

    def __init__(self, reference: Reference, flash_dir: Path) -> None:
        self.reference = reference
        self.model = reference.model
        config = json.loads((flash_dir / "config.json").read_text())
        self.relative = config["flash_relative_threshold"]
        self.absolute = config["flash_absolute_threshold"]
        tensors = flash_tensors(flash_dir)
        dim = config["vision_config"]["hidden_size"]
        llm = config["llm_config"]["hidden_size"]
        self.query_token = tensors["pooling_before_gating.query_token"]
        self.attn = {}
        self.norm = {}
        for i in (1, 2):
            attn = nn.MultiheadAttention(embed_dim=dim, num_heads=16, batch_first=True)
            attn.load_state_dict(_sub(tensors, f"pooling_before_gating.attn{i}."))
            norm = nn.LayerNorm(dim)
            norm.load_state_dict(_sub(tensors, f"pooling_before_gating.norm{i}."))
            self.attn[i], self.norm[i] = attn.eval(), norm.eval()
        self.blocks = []
        for i in range(1, 5):
            block = nn.Sequential(
                nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim), nn.Dropout(0.1),
                nn.LayerNorm(dim),
            )
            block.load_state_dict(_sub(tensors, f"gating.block{i}."))
            self.blocks.append(block.eval())
        self.gate = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2))
        self.gate.load_state_dict(_sub(tensors, "gating.gate."))
        self.gate.eval()
        self.mlp2 = nn.Sequential(
            nn.LayerNorm(16 * dim), nn.Linear(16 * dim, 2 * llm), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(2 * llm, 2 * llm), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * llm, llm),
        )
        self.mlp2.load_state_dict(_sub(tensors, "mlp2."))
        self.mlp2.eval()

    @staticmethod
    def pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale), int(c / scale))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
        return x.permute(0, 2, 1, 3).contiguous()

    @torch.inference_mode()
    def vit_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:, :]
        side = int(hidden.shape[1] ** 0.5)
        return hidden.reshape(hidden.shape[0], side, side, -1)

    @torch.inference_mode()
    def gate_probabilities(self, grid: torch.Tensor) -> torch.Tensor:
        """[T, 2]: every tile is its own sample, as in the released generate path."""
        samples = [tile.reshape(-1, tile.shape[-1]) for tile in grid]
        batch, longest, dim = len(samples), max(s.shape[0] for s in samples), samples[0].shape[-1]
        padded = torch.zeros(batch, longest, dim)
        padding = torch.ones(batch, longest, dtype=torch.bool)
        for i, sample in enumerate(samples):
            padded[i, : sample.shape[0]] = sample
            padding[i, : sample.shape[0]] = False
        query = self.query_token.unsqueeze(0).expand(batch, -1, -1)
        out = self.norm[1](self.attn[1](query, padded, padded, key_padding_mask=padding)[0])
        for _ in range(3):
            out = self.norm[2](self.attn[2](out, padded, padded, key_padding_mask=padding)[0])
        x = out.squeeze(1)
        for block in self.blocks:
            x = x + block(x)
        return torch.softmax(self.gate(x), dim=-1)

    @torch.inference_mode()
    def compress_flags(self, pixel_values: torch.Tensor, groups: list[int]) -> list[bool]:
        """Per-tile decisions; the quantile is taken over each group of consecutive tiles."""
        probs = self.gate_probabilities(self.vit_grid(pixel_values))[:, 0]
        flags: list[bool] = []
        for group in probs.split(groups):
            cut = torch.quantile(group.to(torch.float32), self.relative)
            flags += ((group > cut) & (group >= self.absolute)).tolist()
        return flags

    @torch.inference_mode()
    def prompt_and_embeddings(
        self, conversation: list[dict], quantile_per_image: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """(input_ids, inputs_embeds, per-tile compress flags) after the released token deletion."""
        inputs = self.reference.inputs(conversation)
        input_ids = inputs["input_ids"][0]
        embeds = self.model.get_input_embeddings()(input_ids)
        pixel_values = inputs["pixel_values"]
        grid = self.vit_grid(pixel_values)
        is_context = (input_ids == IMG_CONTEXT_ID).int()
        edges = torch.diff(torch.cat([torch.tensor([0]), is_context, torch.tensor([0])]))
        starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
        image_tiles = [(end - start) // 256 for start, end in zip(starts.tolist(), ends.tolist())]
        flags = self.compress_flags(pixel_values, image_tiles if quantile_per_image else [sum(image_tiles)])
        features_256 = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        shuffled = self.pixel_shuffle(grid, 0.25)
        features_64 = self.mlp2(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))
        selected = torch.cat([features_64[i] if f else features_256[i] for i, f in enumerate(flags)])

        keep = torch.ones(input_ids.shape[0], dtype=torch.bool)
        tile = 0
        for start, end in zip(starts.tolist(), ends.tolist()):
            assert (end - start) % 256 == 0
            for block in range((end - start) // 256):
                if flags[tile]:
                    keep[start + block * 256 + 64 : start + (block + 1) * 256] = False
                tile += 1
        input_ids, embeds = input_ids[keep], embeds[keep].clone()
        embeds[input_ids == IMG_CONTEXT_ID] = selected
        return input_ids, embeds, flags

    @torch.inference_mode()
    def generate(
        self, conversation: list[dict], max_new_tokens: int, quantile_per_image: bool = False
    ) -> tuple[list[int], int, list[bool]]:
        """Greedy tokens, the prompt length after deletion, and the per-tile compress flags."""
        input_ids, embeds, flags = self.prompt_and_embeddings(conversation, quantile_per_image)
        out = self.model.generate(
            inputs_embeds=embeds.unsqueeze(0),
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        return out[0].tolist(), int(input_ids.shape[0]), flags
