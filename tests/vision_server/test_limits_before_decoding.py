"""The per-request tile budget is checked before pictures are decoded, and pictures are decoded one at a time."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.config import ImageLimits
from pipeline.wire import VisionJob
from tests.vision_server.conftest import vision_config
from tests.vision_server.helpers import moving_frames, mp4_bytes
from vision_server import jobs
from vision_server.jobs import JobError, load_pixels
from vision_server.preprocess import decode_image, image_size
from vision_server.video import VideoReader


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def multi_image_job(*images: tuple[bytes, int]) -> VisionJob:
    return VisionJob(job_id="j", request_id="r", kind="image", data=b"", reply_to="unused", images=images)


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of the images load_pixels decodes."""
    sizes: list[tuple[int, int]] = []

    def counting(data: bytes, limits: ImageLimits) -> Image.Image:
        image = decode_image(data, limits)
        sizes.append(image.size)
        return image

    monkeypatch.setattr(jobs, "decode_image", counting)
    return sizes


def test_a_multi_image_job_over_the_budget_is_refused_before_any_decoding(decoded):
    config = vision_config(**{"images.max_tiles_per_request": 20})
    big = png(1000, 1000)  # a 3x3 grid plus a thumbnail: 10 tiles
    with pytest.raises(JobError, match="30 tiles exceed the limit of 20 tiles per request"):
        load_pixels(multi_image_job((big, 12), (big, 12), (big, 12)), config)
    assert decoded == []
    with pytest.raises(JobError, match="21 images exceed the limit of 20 tiles per request"):
        load_pixels(multi_image_job(*[(png(8, 8), 1)] * 21), config)
    assert decoded == []
    pixels, counts = load_pixels(multi_image_job((big, 12), (big, 6)), config)
    assert counts == (10, 5) and pixels.shape[0] == 15 and len(decoded) == 2


def test_a_video_over_the_budget_stops_after_its_first_frame(monkeypatch):
    frames_read: list[int] = []
    original = VideoReader.frame

    def counting(self: VideoReader, index: int) -> Image.Image:
        frames_read.append(index)
        return original(self, index)

    monkeypatch.setattr(VideoReader, "frame", counting)
    wide = mp4_bytes(moving_frames(12, width=640, height=240), fps=24)  # 3 tiles per frame at max_tiles=4
    job = VisionJob(
        job_id="v", request_id="r", kind="video", data=wide, reply_to="unused", max_tiles=4, use_thumbnail=False,
        num_segments=6,
    )
    with pytest.raises(JobError, match="18 tiles exceed the limit of 8 tiles per request"):
        load_pixels(job, vision_config(**{"images.max_tiles_per_request": 8}))
    assert len(frames_read) == 1


def test_image_size_reads_the_header_and_follows_exif_rotation():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    Image.new("RGB", (600, 300), (10, 20, 30)).save(buffer, "JPEG", exif=exif)
    data = buffer.getvalue()
    assert image_size(data, ImageLimits()) == (300, 600) == decode_image(data, ImageLimits()).size
    assert image_size(png(640, 480), ImageLimits()) == (640, 480)
