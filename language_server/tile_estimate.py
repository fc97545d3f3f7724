"""How many tiles a vision server will make of an image or video, read cheaply from headers.

Read once, when a request is built: to enforce the per-request tile limit before any job is
sent, and to pick the vision replica with the fewest outstanding tiles. Images: the size comes
from the file header (no pixels are decoded) and the grid follows InternVL's dynamic tiling
rule. Videos: an upper bound, frames x the most tiles one frame may get.
"""

from __future__ import annotations

import io

from PIL import Image

from pipeline.model.image_header import check_structure
from pipeline.model.tiling import most_tiles, tile_count, upright_size
from pipeline.wire import VisionJob


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the image will be shown upright, or None when the header is unreadable
    (or refused by check_structure: the vision server says why)."""
    try:
        check_structure(data)
        with Image.open(io.BytesIO(data)) as image:
            return upright_size(image)
    except Exception:  # noqa: BLE001 - unreadable here; the vision server reports why
        return None


def image_tiles(data: bytes, min_tiles: int, max_tiles: int, use_thumbnail: bool) -> int | None:
    """Tiles of an encoded image, or None when its header cannot be read."""
    size = image_size(data)
    if size is None or min(size) < 1:
        return None
    return tile_count(size[0], size[1], min_tiles, max_tiles, use_thumbnail)


def video_tiles(num_segments: int, max_tiles_per_frame: int, use_thumbnail: bool) -> int:
    """At most this many tiles for a video (every frame at its largest grid)."""
    return num_segments * most_tiles(max_tiles_per_frame, use_thumbnail)


def estimate_tiles(job: VisionJob) -> int:
    """Tiles the vision server will encode for a job (an upper bound when an image header is
    unreadable), for a job sent on its own; a request's jobs carry the counts read when the
    request was built (language_server/media_layout.py)."""
    if job.kind == "video":
        return video_tiles(job.num_segments, job.max_tiles, job.use_thumbnail)
    total = 0
    for data, max_tiles in job.image_items:
        tiles = image_tiles(data, job.min_tiles, max_tiles, job.use_thumbnail)
        total += most_tiles(max_tiles, job.use_thumbnail) if tiles is None else tiles
    return total
