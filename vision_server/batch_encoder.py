"""The encoder over one batch: the ViT over the tiles of many jobs, in chunks of at most
max_batch_tiles, ViR routing per job, and each tile through the projector its routing picks.

Without the router, every tile's token count is known before encoding (all 256, or all 64),
so the rows of each finished chunk can leave while the next chunk encodes; with it, routing
a job needs the ViT grids of all its tiles first.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from vision_server.jobs import PreparedJob
from vision_server.model import VisionEncoder, pixel_shuffle
from vision_server.vir import VisualResolutionRouter, compressed_tiles

ChunkSink = Callable[[list[torch.Tensor]], None]


class BatchEncoder:
    """Per-tile feature rows of a batch of prepared jobs."""

    def __init__(
        self, encoder: VisionEncoder, router: VisualResolutionRouter | None, max_batch_tiles: int, tokens_per_tile: int
    ) -> None:
        self.encoder = encoder
        self.router = router
        self.max_batch_tiles = max_batch_tiles
        self.tokens_per_tile = tokens_per_tile

    def routes(self, ready: Sequence[PreparedJob]) -> bool:
        """Whether the router decides the token counts of some job of the batch."""
        return self.router is not None and any(p.token_mode == "router" for p in ready)

    def planned_tile_tokens(self, ready: Sequence[PreparedJob]) -> list[int]:
        """Every tile's token count, in order, for a batch that the router does not route."""
        full = self.tokens_per_tile
        return [full // 4 if compressed else full for compressed in self._compressed(ready, None)]

    @torch.inference_mode()
    def tile_rows(self, ready: Sequence[PreparedJob], on_chunk: ChunkSink | None = None) -> list[torch.Tensor]:
        """The feature rows of every tile of the batch, in order. When the batch is not routed,
        `on_chunk(rows so far)` follows every chunk but the last."""
        chunks = torch.cat([p.pixels for p in ready]).split(self.max_batch_tiles)
        if self.routes(ready):
            grid = torch.cat([self.encoder.vit_grid(chunk) for chunk in chunks])
            scores = self.router.scores(grid).split([p.tiles for p in ready])
            return self._project(grid, self._compressed(ready, scores))
        compress = self._compressed(ready, None)
        tile_rows: list[torch.Tensor] = []
        for chunk in chunks:
            tile_rows += self._project(self.encoder.vit_grid(chunk), compress[len(tile_rows):][: len(chunk)])
            if on_chunk is not None and len(tile_rows) < len(compress):
                on_chunk(tile_rows)
        return tile_rows

    def _compressed(self, ready: Sequence[PreparedJob], scores: Sequence[torch.Tensor] | None) -> list[bool]:
        """For every tile of the batch, in order: is it compressed to a quarter of its tokens."""
        thresholds = self.router.thresholds if self.router is not None else None
        compress: list[bool] = []
        for i, prep in enumerate(ready):
            compress += compressed_tiles(prep.token_mode, scores[i] if scores else None, thresholds, prep.tiles)
        return compress

    def _project(self, grid: torch.Tensor, compress: list[bool]) -> list[torch.Tensor]:
        """Per-tile feature rows of a ViT grid, each tile through the projector its flag picks."""
        mask = torch.tensor(compress, dtype=torch.bool, device=grid.device)
        full = self.encoder.project_full(grid[~mask]) if not mask.all() else None
        small = None
        if mask.any():
            small = self.router.project_compressed(pixel_shuffle(grid[mask], self.encoder.downsample_ratio**2))
        return _assemble(compress, full, small)


def _assemble(compress: list[bool], full: torch.Tensor | None, small: torch.Tensor | None) -> list[torch.Tensor]:
    """Per-tile feature rows in tile order, taken from the full and compressed projections."""
    out, next_full, next_small = [], 0, 0
    for compressed in compress:
        if compressed:
            out.append(small[next_small])
            next_small += 1
        else:
            out.append(full[next_full])
            next_full += 1
    return out
