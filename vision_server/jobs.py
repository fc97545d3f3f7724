"""One job on its way through a vision server: limits, decoding and tiling, and its state.

`load_pixels` turns a VisionJob's bytes into normalised tiles after checking every
configured limit; any problem becomes a JobError that is answered to the requester as
data (a FeatureHeader status and message), never an exception that escapes the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from pipeline.config import DvDConfig
from pipeline.wire import JobStatus, VisionJob
from vision_server.feature_cache import CachedFeatures
from pipeline.model.tiling import tile_count
from vision_server.preprocess import ImageError, TilingParams, decode_image, image_size, tile_image, to_pixel_values
from vision_server.video import VideoSampling, iter_video_frames
from vision_server.vir import TokenMode


class JobError(Exception):
    """A job cannot be answered with features; `status` is a JobStatus code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class PreparedJob:
    """A job after preprocessing: tiles for the encoder, a cache hit, or an error."""

    job: VisionJob
    arrived: float  # Unix time the job reached this server
    token_mode: TokenMode = "all_256"
    cache_key: str | None = None
    pixels: torch.Tensor | None = None  # [T, 3, S, S] when the encoder must run
    frame_tiles: tuple[int, ...] = ()
    cached: CachedFeatures | None = None
    error: JobError | None = None
    started: float = 0.0  # preprocessing began
    preprocessed: float = 0.0  # preprocessing ended
    ready_monotonic: float = field(default_factory=time.monotonic)

    @property
    def tiles(self) -> int:
        return 0 if self.pixels is None else int(self.pixels.shape[0])

    @property
    def needs_encoder(self) -> bool:
        return self.error is None and self.cached is None and self.pixels is not None


def check_parameters(job: VisionJob, config: DvDConfig) -> None:
    """Reject parameters outside the configured limits before any decoding."""
    images, video = config.images, config.video
    if job.kind == "image":
        for data, max_tiles in job.image_items:
            if max_tiles > images.max_tiles:
                raise JobError(JobStatus.INVALID_INPUT, f"max_tiles {max_tiles} exceeds the server limit {images.max_tiles}")
            if len(data) > images.max_image_bytes:
                raise JobError(
                    JobStatus.INVALID_INPUT, f"image data is {len(data)} bytes, over the limit of {images.max_image_bytes}"
                )
        return
    if job.max_tiles > video.max_tiles_per_frame:
        raise JobError(
            JobStatus.INVALID_INPUT,
            f"{job.max_tiles} tiles per frame exceed the server limit {video.max_tiles_per_frame}",
        )
    if not 1 <= job.num_segments <= video.max_segments:
        raise JobError(JobStatus.INVALID_INPUT, f"num_segments must be in 1..{video.max_segments}, got {job.num_segments}")
    if len(job.data) > video.max_video_bytes:
        raise JobError(
            JobStatus.INVALID_INPUT, f"video data is {len(job.data)} bytes, over the limit of {video.max_video_bytes}"
        )


def max_job_bytes(config: DvDConfig) -> int:
    """The largest serialized VisionJob a vision server takes: its largest media (a video, an
    image, or the images of one request, which the language server bounds by max_request_bytes)
    plus room for the other fields. A larger message disconnects its sender."""
    largest = max(config.video.max_video_bytes, config.images.max_image_bytes, config.language.max_request_bytes)
    return largest + JOB_OVERHEAD_BYTES


JOB_OVERHEAD_BYTES = 1 << 20  # ids, reply address, parameters and protobuf framing


def load_pixels(job: VisionJob, config: DvDConfig, tile_size: int = 448) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Decode and tile a job's media: pixel values [T, 3, S, S] and the tiles of each video frame
    or of each image of a multi-image job (empty for a single image).

    The tile budget is checked before any picture is decoded (from image headers; for a video,
    from its first frame), and pictures are decoded and tiled one at a time."""
    check_parameters(job, config)
    try:
        tiling = TilingParams(job.min_tiles, job.max_tiles, job.use_thumbnail, tile_size)
        if job.kind == "image":
            return _image_pixels(job, config, tiling, tile_size)
        return _video_pixels(job, config, tiling, tile_size)
    except ImageError as exc:
        raise JobError(JobStatus.INVALID_INPUT, str(exc)) from None


def _image_pixels(
    job: VisionJob, config: DvDConfig, tiling: TilingParams, tile_size: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    budget = config.images.max_tiles_per_request
    items = job.image_items
    if len(items) > budget:  # every image is at least one tile
        raise JobError(JobStatus.INVALID_INPUT, f"{len(items)} images exceed the limit of {budget} tiles per request")
    tilings = [replace(tiling, max_tiles=max_tiles) for _, max_tiles in items]
    _check_budget(sum(_tile_count(image_size(data, config.images), t) for (data, _), t in zip(items, tilings)), budget)
    pictures = ((decode_image(data, config.images), t) for (data, _), t in zip(items, tilings))
    tiles, counts = _tile_pictures(pictures, budget)
    return to_pixel_values(tiles, tile_size), tuple(counts) if len(counts) > 1 else ()


def _video_pixels(
    job: VisionJob, config: DvDConfig, tiling: TilingParams, tile_size: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    budget = config.images.max_tiles_per_request
    if job.num_segments > budget:  # every frame is at least one tile
        raise JobError(JobStatus.INVALID_INPUT, f"{job.num_segments} frames exceed the limit of {budget} tiles per request")
    sampling = VideoSampling(job.num_segments, job.start_s, job.end_s)
    frames = ((frame, tiling) for frame in iter_video_frames(job.data, sampling, config.video, config.images))
    tiles, counts = _tile_pictures(frames, budget, video_frames=job.num_segments)
    return to_pixel_values(tiles, tile_size), tuple(counts)


def _tile_pictures(
    pictures: Iterator[tuple[Image.Image, TilingParams]], budget: int, video_frames: int = 0
) -> tuple[list[Image.Image], list[int]]:
    """The tiles of pictures decoded one at a time, and each picture's tile count. Before a picture
    is tiled, its tiles are checked to keep the request within `budget`; for a video of
    `video_frames` frames, those of all frames are checked from the first."""
    tiles, counts = [], []
    for picture, tiling in pictures:
        if video_frames and not counts:  # every frame has the first one's size
            _check_budget(video_frames * _tile_count(picture.size, tiling), budget)
        _check_budget(len(tiles) + _tile_count(picture.size, tiling), budget)
        cut = tile_image(picture, tiling)
        del picture
        tiles += cut
        counts.append(len(cut))
    return tiles, counts


def _tile_count(size: tuple[int, int], tiling: TilingParams) -> int:
    return tile_count(size[0], size[1], tiling.min_tiles, tiling.max_tiles, tiling.use_thumbnail, tiling.tile_size)


def _check_budget(tiles: int, budget: int) -> None:
    if tiles > budget:
        raise JobError(JobStatus.INVALID_INPUT, f"{tiles} tiles exceed the limit of {budget} tiles per request")
