"""Video bytes -> sampled RGB frames, with decord, following InternVL's published recipe.

`num_segments` frames are taken at the centres of equal segments of the (optionally
time-bounded) video; see docs/checkpoints.md. Limits on bytes, duration, frame
count and frame size are checked before any frame is decoded.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from pipeline.config import ImageLimits, VideoLimits
from vision_server.preprocess import ImageError

@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video to take."""

    num_segments: int
    start_s: float | None = None
    end_s: float | None = None


def sample_frame_indices(
    num_frames: int, fps: float, num_segments: int, start_s: float | None = None, end_s: float | None = None
) -> list[int]:
    """Frame indices at the centres of `num_segments` equal segments of [start_s, end_s].

    With `max_frame = num_frames - 1`: start = max(0, round(start_s * fps)), end =
    min(round(end_s * fps), max_frame), seg = (end - start) / num_segments, and frame i is
    int(start + seg / 2 + round(seg * i)). Missing bounds mean the whole video.
    """
    if num_frames < 1 or num_segments < 1:
        raise ValueError(f"need at least one frame and one segment (frames={num_frames}, segments={num_segments})")
    max_frame = num_frames - 1
    first = 0 if start_s is None else max(0, round(start_s * fps))
    last = max_frame if end_s is None else min(round(end_s * fps), max_frame)
    segment = (last - first) / num_segments
    return [int(first + segment / 2 + round(segment * i)) for i in range(num_segments)]


class VideoReader:
    """An opened video: frame count, frame rate and random access to RGB frames."""

    def __init__(self, data: bytes) -> None:
        import decord

        try:
            self._reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
        except Exception as exc:  # noqa: BLE001 - decord raises several unrelated types for bad input
            raise ImageError(f"not a readable video: {_first_line(exc)}") from None
        if self.num_frames < 1 or not self.fps > 0:
            raise ImageError(f"video has {self.num_frames} frames at {self.fps} fps; cannot sample it")

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps

    def frame(self, index: int) -> Image.Image:
        try:
            pixels = self._reader.get_batch([index]).asnumpy()[0]
        except Exception as exc:  # noqa: BLE001
            raise ImageError(f"cannot decode video frame {index}: {_first_line(exc)}") from None
        return Image.fromarray(pixels).convert("RGB")


def iter_video_frames(
    data: bytes, sampling: VideoSampling, video_limits: VideoLimits, image_limits: ImageLimits
) -> Iterator[Image.Image]:
    """The sampled frames of a video, decoded one at a time as they are taken; the checks that
    need no frame run before the first one is decoded (ImageError says why)."""
    if not data:
        raise ImageError("empty video data")
    if len(data) > video_limits.max_video_bytes:
        raise ImageError(f"video data is {len(data)} bytes, over the limit of {video_limits.max_video_bytes}")
    if not 1 <= sampling.num_segments <= video_limits.max_segments:
        raise ImageError(f"num_segments must be in 1..{video_limits.max_segments}, got {sampling.num_segments}")
    for name, value in (("start_s", sampling.start_s), ("end_s", sampling.end_s)):
        if value is not None and value < 0:
            raise ImageError(f"{name} must not be negative, got {value}")
    if sampling.start_s is not None and sampling.end_s is not None and sampling.end_s <= sampling.start_s:
        raise ImageError(f"end_s ({sampling.end_s}) must be after start_s ({sampling.start_s})")
    reader = VideoReader(data)
    if reader.duration_s > video_limits.max_duration_s:
        raise ImageError(f"video lasts {reader.duration_s:.1f} s, over the limit of {video_limits.max_duration_s:g} s")
    indices = sample_frame_indices(reader.num_frames, reader.fps, sampling.num_segments, sampling.start_s, sampling.end_s)
    if sampling.start_s is not None and round(sampling.start_s * reader.fps) > reader.num_frames - 1:
        raise ImageError(f"start_s {sampling.start_s:g} is past the end of the video ({reader.duration_s:.2f} s)")
    return _frames(reader, indices, image_limits)


def _frames(reader: VideoReader, indices: list[int], image_limits: ImageLimits) -> Iterator[Image.Image]:
    for index in indices:
        frame = reader.frame(index)
        width, height = frame.size
        if width * height > image_limits.max_image_pixels:
            raise ImageError(f"video frames are {width}x{height}, over the limit of {image_limits.max_image_pixels} pixels")
        if min(width, height) < image_limits.min_image_side:
            raise ImageError(f"video frames too small: {width}x{height}")
        yield frame


def _first_line(exc: BaseException) -> str:
    """decord's message without its time stamp and source location."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)[:200]
