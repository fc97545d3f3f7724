"""Where a request's images and videos go: the vision jobs that encode them, the tiles each job
makes, and where each job's answer rows land among the prompt's feature rows.

Pure functions, shared by the decoupled `RemoteMedia` and the colocated baseline.
"""

from __future__ import annotations

import uuid
from collections import deque

import torch

from language_server.engine.arriving_rows import Placement, place_rows
from language_server.prompt import MediaLayout
from language_server.request import GenerationRequest, ImagePart, VideoPart
from language_server.tile_estimate import video_tiles
from pipeline.config import DvDConfig
from pipeline.errors import InternalError
from pipeline.model.tiling import most_tiles
from pipeline.wire import FeatureHeader, VisionJob


def new_job_id() -> str:
    return uuid.uuid4().hex


def vision_jobs(req: GenerationRequest, config: DvDConfig, group_images: bool) -> list[VisionJob]:
    """The jobs for a request's images and videos (reply_to is filled by the sender)."""
    return [job for job, _ in tiled_jobs(req, config, group_images)]


def tiled_jobs(req: GenerationRequest, config: DvDConfig, group_images: bool) -> list[tuple[VisionJob, int]]:
    """The jobs for a request's images and videos, each with the tiles it will make.

    With `group_images` (ViR checkpoints) all images of the request travel as one job, so that
    the router's quantile is taken over every tile of the request; otherwise one job per image.
    Video frames follow the images' thumbnail rule, as InternVL's `load_video` tiles each frame
    like an image (a frame cut into several tiles gets a thumbnail after them).
    """
    images = config.images
    image_parts = [p for p in req.media if isinstance(p, ImagePart)]
    grouped = group_images and len(image_parts) > 1
    common = dict(request_id=req.request_id, reply_to="", min_tiles=images.min_tiles)
    jobs = []
    if grouped:
        items = tuple((p.data, p.max_tiles) for p in image_parts)
        job = VisionJob(job_id=new_job_id(), kind="image", data=b"", images=items, use_thumbnail=images.use_thumbnail,
                        max_tiles=max(p.max_tiles for p in image_parts), **common)
        jobs.append((job, sum(part_tiles(p, images.use_thumbnail) for p in image_parts)))
    for part in req.media:
        if isinstance(part, ImagePart) and not grouped:
            job = VisionJob(job_id=new_job_id(), kind="image", data=part.data, max_tiles=part.max_tiles,
                            use_thumbnail=images.use_thumbnail, **common)
            jobs.append((job, part_tiles(part, images.use_thumbnail)))
        elif isinstance(part, VideoPart):
            job = VisionJob(job_id=new_job_id(), kind="video", data=part.data, max_tiles=part.max_tiles_per_frame,
                            use_thumbnail=images.use_thumbnail, num_segments=part.num_segments, start_s=part.start_s,
                            end_s=part.end_s, **{**common, "min_tiles": 1})
            jobs.append((job, part_tiles(part, images.use_thumbnail)))
    return jobs


def part_tiles(part: ImagePart | VideoPart, use_thumbnail: bool) -> int:
    """Tiles a vision server will make of an image (the count read from its header when the
    request was built; the most its max_tiles allows when that was unreadable) or, at most, of a video."""
    if isinstance(part, VideoPart):
        return video_tiles(part.num_segments, part.max_tiles_per_frame, use_thumbnail)
    return most_tiles(part.max_tiles, use_thumbnail) if part.tiles is None else part.tiles


def media_placements(
    req: GenerationRequest, jobs: list[VisionJob], headers: list[FeatureHeader]
) -> tuple[list[MediaLayout], list[list[Placement]]]:
    """Layouts in prompt order, and where each job's answer rows go among the prompt's feature
    rows (a multi-image job's images may lie apart, with videos between them)."""
    images: deque[tuple[MediaLayout, int, int]] = deque()  # (layout, job, first row of the job's answer)
    videos: deque[tuple[MediaLayout, int, int]] = deque()
    for index, (job, header) in enumerate(zip(jobs, headers)):
        if job.kind == "video":
            videos.append((MediaLayout(header.tile_tokens, header.frame_tiles), index, 0))
            continue
        tile = row = 0
        for count in header.frame_tiles or (len(header.tile_tokens),):
            tokens = header.tile_tokens[tile : tile + count]
            images.append((MediaLayout(tokens), index, row))
            tile, row = tile + count, row + sum(tokens)
    ordered = [images.popleft() if isinstance(p, ImagePart) else videos.popleft() for p in req.media]
    placements: list[list[Placement]] = [[] for _ in jobs]
    row = 0
    for layout, job, job_row in ordered:
        placements[job].append(Placement(job_row, row, layout.rows))
        row += layout.rows
    return [layout for layout, _, _ in ordered], placements


def per_media(
    req: GenerationRequest, jobs: list[VisionJob], answers: list[tuple[FeatureHeader, torch.Tensor]]
) -> tuple[list[MediaLayout], torch.Tensor | None]:
    """Layouts and feature rows in prompt order, splitting multi-image jobs back into images."""
    layouts, placements = media_placements(req, jobs, [header for header, _ in answers])
    if not layouts:
        return layouts, None
    return layouts, placed_rows(layouts, placements, [tensor for _, tensor in answers])


def placed_rows(layouts: list[MediaLayout], placements: list[list[Placement]], parts: list[torch.Tensor]) -> torch.Tensor:
    """The prompt's feature rows, with each job's first part (its whole answer, or the start of
    it) put in place; rows of parts still to come are left unset."""
    rows = torch.empty(sum(layout.rows for layout in layouts), parts[0].shape[1], dtype=parts[0].dtype)
    for job, part in enumerate(parts):
        place_rows(rows, placements[job], 0, part)
    return rows


def check_frame_tiles(jobs: list[VisionJob], headers: list[FeatureHeader]) -> None:
    """Each answer must describe what its job asked for: one frame_tiles entry per image of a
    multi-image job (a single image may leave it empty), one per sampled frame of a video."""
    for job, header in zip(jobs, headers):
        expected = job.num_segments if job.kind == "video" else len(job.image_items)
        entries = len(header.frame_tiles) if header.frame_tiles or job.kind == "video" else 1
        if entries != expected:
            what = "frames" if job.kind == "video" else "images"
            raise InternalError(
                f"vision job {job.job_id} ({job.kind}) was answered with tile counts for {entries} {what}, "
                f"not {expected}"
            )
