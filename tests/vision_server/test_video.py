"""vision_server.video: the published frame-sampling recipe, decoding against PyAV, limits, and video jobs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ImageLimits, VideoLimits
from pipeline.wire import JobStatus, VisionJob
from tests.vision_server.helpers import decode_video_frames, moving_frames, mp4_bytes, pyav_frames
from vision_server.preprocess import ImageError
from vision_server.video import VideoSampling, sample_frame_indices

FPS = 24


@pytest.fixture(scope="module")
def clip() -> bytes:
    return mp4_bytes(moving_frames(48), fps=FPS)  # 2 seconds


@pytest.fixture(scope="module")
def clip_frames(clip) -> list[np.ndarray]:
    return pyav_frames(clip)


def test_sampling_recipe_by_hand():
    # 48 frames, 8 segments: seg = 47/8; frame i = int(2.9375 + round(5.875 * i)), rounding half to even
    assert sample_frame_indices(48, FPS, 8) == [2, 8, 14, 20, 26, 31, 37, 43]
    assert sample_frame_indices(48, FPS, 1) == [23]
    # [0.5 s, 1.5 s] at 24 fps is frames 12..36: seg = 6
    assert sample_frame_indices(48, FPS, 4, start_s=0.5, end_s=1.5) == [15, 21, 27, 33]
    assert sample_frame_indices(48, FPS, 2, end_s=100.0) == sample_frame_indices(48, FPS, 2)
    # more segments than frames repeat frames
    assert sample_frame_indices(3, FPS, 8) == [0, 0, 0, 1, 1, 1, 2, 2]


def test_decoded_frames_equal_pyav_frames(clip, clip_frames):
    frames = decode_video_frames(clip, VideoSampling(8), VideoLimits(), ImageLimits())
    assert len(clip_frames) == 48
    for frame, index in zip(frames, sample_frame_indices(48, FPS, 8)):
        assert frame.mode == "RGB" and frame.size == (320, 240)
        assert np.array_equal(np.asarray(frame), clip_frames[index])


@pytest.mark.parametrize(
    ("sampling", "video_limits", "message"),
    [
        (VideoSampling(8), VideoLimits(max_duration_s=1.5), "video lasts 2.0 s, over the limit of 1.5 s"),
        (VideoSampling(8), VideoLimits(max_video_bytes=1000), "over the limit of 1000"),
        (VideoSampling(65), VideoLimits(), "num_segments must be in 1..64"),
        (VideoSampling(4, start_s=5.0), VideoLimits(), "start_s 5 is past the end of the video"),
        (VideoSampling(4, start_s=1.0, end_s=0.5), VideoLimits(), "end_s (0.5) must be after start_s (1.0)"),
        (VideoSampling(4, start_s=-1.0), VideoLimits(), "start_s must not be negative"),
    ],
)
def test_limits(clip, sampling, video_limits, message):
    with pytest.raises(ImageError) as info:
        decode_video_frames(clip, sampling, video_limits, ImageLimits())
    assert message in str(info.value)


def test_frame_size_limit_and_unreadable_data(clip):
    with pytest.raises(ImageError, match="video frames are 320x240, over the limit of 50000 pixels"):
        decode_video_frames(clip, VideoSampling(2), VideoLimits(), ImageLimits(max_image_pixels=50_000))
    for bad in (b"not a video" * 100, clip[: len(clip) // 3], b""):
        with pytest.raises(ImageError):
            decode_video_frames(bad, VideoSampling(2), VideoLimits(), ImageLimits())


def video_job(data: bytes, **fields) -> VisionJob:
    return VisionJob(job_id="v", request_id="r", kind="video", data=data, reply_to="unused", **fields)


def test_a_video_job_is_its_frames_encoded_as_images(worker, clip, clip_frames):
    ((header, rows),) = worker.encode([video_job(clip, num_segments=4, max_tiles=1, use_thumbnail=False)])
    assert header.ok and header.frame_tiles == (1, 1, 1, 1) and header.tile_tokens == (256,) * 4
    images = []
    for index in sample_frame_indices(48, FPS, 4):
        buffer = io.BytesIO()
        Image.fromarray(clip_frames[index]).save(buffer, "PNG")
        images.append(VisionJob(job_id=f"f{index}", request_id="r", kind="image", data=buffer.getvalue(),
                                reply_to="unused", max_tiles=1))
    expected = torch.cat([frame_rows for _, frame_rows in worker.encode(images)])
    assert torch.equal(rows, expected)


def test_tiles_per_frame_and_the_request_tile_budget(worker):
    wide = mp4_bytes(moving_frames(12, width=640, height=240), fps=FPS)
    ((header, rows),) = worker.encode([video_job(wide, num_segments=3, max_tiles=4, use_thumbnail=False)])
    assert header.frame_tiles == (3, 3, 3) and rows.shape[0] == 9 * 256  # a 3x1 grid per frame
    ((thumbs, _),) = worker.encode([video_job(wide, num_segments=3, max_tiles=4, use_thumbnail=True)])
    assert thumbs.frame_tiles == (4, 4, 4)

    from tests.vision_server.conftest import vision_config
    from vision_server.worker import VisionWorker

    limited = VisionWorker(vision_config(**{"images.max_tiles_per_request": 8}))
    try:
        ((over, none),) = limited.encode([video_job(wide, num_segments=3, max_tiles=4, use_thumbnail=False)])
    finally:
        limited.close()
    assert over.status == JobStatus.INVALID_INPUT and none is None
    assert "9 tiles exceed the limit of 8 tiles per request" in over.error_message


def test_multi_tile_frames_get_a_thumbnail_like_internvl_load_video():
    """InternVL's load_video tiles each frame with use_thumbnail=True: a frame cut into several
    tiles gets a thumbnail last. The job the language server builds asks for that, its tile
    estimate equals what is made, and each frame's pixels equal the GotOcr2 reference's."""
    from language_server.media_layout import vision_jobs
    from language_server.request import ChatMessage, GenerationRequest, TextPart, VideoPart, _tiles
    from language_server.engine.sampling import SamplingParams
    from language_server.tile_estimate import estimate_tiles
    from pipeline.model.tiny_processors import build_image_processor
    from tests.vision_server.conftest import vision_config
    from vision_server.jobs import load_pixels

    config = vision_config()
    wide = mp4_bytes(moving_frames(12, width=640, height=240), fps=FPS)
    part = VideoPart(wide, num_segments=2, max_tiles_per_frame=3)
    request = GenerationRequest("r", (ChatMessage("user", (part, TextPart("?"))),), SamplingParams())
    (job,) = vision_jobs(request, config, group_images=False)
    pixels, frame_tiles = load_pixels(job, config)
    assert frame_tiles == (4, 4)  # a 3x1 grid plus the thumbnail, per frame
    assert estimate_tiles(job) == _tiles(part, config) == sum(frame_tiles)

    frames = decode_video_frames(wide, VideoSampling(2), VideoLimits(), ImageLimits())
    expected = build_image_processor()(images=frames, max_patches=3, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)
    thumbnails = build_image_processor()(images=frames, max_patches=1, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels[3::4], thumbnails, atol=1e-6, rtol=0)  # the thumbnail is last
