"""Jobs for a request's media, the tiles each makes, and answers split back into prompt order."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from language_server import tile_estimate
from language_server.engine.sampling import SamplingParams
from language_server.media_layout import per_media, tiled_jobs, vision_jobs
from language_server.request import ChatMessage, GenerationRequest, ImagePart, TextPart, VideoPart
from language_server.tile_estimate import estimate_tiles
from pipeline.client import image, message, video
from pipeline.config import DvDConfig
from pipeline.wire import FeatureHeader, VisionJob
from proto.dvd.v1 import generate_pb2 as pb
from tests.conftest import photo_bytes

IMG_A, IMG_B = ImagePart(b"a", 6), ImagePart(b"b", 12)
VIDEO = VideoPart(b"v", num_segments=2, max_tiles_per_frame=1)
REQUEST = GenerationRequest(
    "r", (ChatMessage("user", (IMG_A, VIDEO, IMG_B, TextPart("?"))),), SamplingParams(max_new_tokens=1)
)


def test_one_job_per_medium_without_vir():
    jobs = vision_jobs(REQUEST, DvDConfig(), group_images=False)
    assert [(j.kind, j.data, j.max_tiles) for j in jobs] == [("image", b"a", 6), ("video", b"v", 1), ("image", b"b", 12)]
    assert len({j.job_id for j in jobs}) == 3


def test_vir_groups_the_images_of_a_request_into_one_job():
    jobs = vision_jobs(REQUEST, DvDConfig(), group_images=True)
    assert [j.kind for j in jobs] == ["image", "video"]
    assert jobs[0].images == ((b"a", 6), (b"b", 12)) and jobs[0].data == b""
    sent = replace(jobs[0], reply_to="tcp://127.0.0.1:1")
    assert VisionJob.decode(sent.encode()) == sent
    single = GenerationRequest("s", (ChatMessage("user", (IMG_A,)),), SamplingParams())
    assert vision_jobs(single, DvDConfig(), group_images=True)[0].data == b"a"


def test_video_jobs_follow_the_images_thumbnail_rule():
    video_only = GenerationRequest("v", (ChatMessage("user", (VIDEO, TextPart("?"))),), SamplingParams())
    (job,) = vision_jobs(video_only, DvDConfig(), group_images=False)
    assert job.use_thumbnail  # as InternVL's load_video, which tiles every frame with a thumbnail
    no_thumbnails = replace(DvDConfig(), images=replace(DvDConfig().images, use_thumbnail=False))
    (job,) = vision_jobs(video_only, no_thumbnails, group_images=False)
    assert not job.use_thumbnail


def _answer(job: VisionJob, tile_tokens: tuple[int, ...], frame_tiles: tuple[int, ...], first_row: float):
    rows = torch.arange(sum(tile_tokens), dtype=torch.float32)[:, None] + first_row
    return FeatureHeader(job.job_id, "r", tile_tokens=tile_tokens, frame_tiles=frame_tiles, shape=rows.shape), rows


def test_answers_are_split_back_in_prompt_order():
    jobs = vision_jobs(REQUEST, DvDConfig(), group_images=True)
    grouped = _answer(jobs[0], (256, 64, 64), (1, 2), first_row=0)  # image a: 1 tile; image b: 2 tiles
    video = _answer(jobs[1], (256, 256), (1, 1), first_row=1000)
    layouts, rows = per_media(REQUEST, jobs, [grouped, video])
    assert [layout.tile_tokens for layout in layouts] == [(256,), (256, 256), (64, 64)]
    assert layouts[1].frame_tiles == (1, 1)
    expected = torch.cat([grouped[1][:256], video[1], grouped[1][256:]])
    assert torch.equal(rows, expected)



@pytest.mark.parametrize("group_images", [False, True])
def test_each_image_header_is_read_once_and_the_jobs_carry_its_tile_count(monkeypatch, group_images):
    """The tile count read when the request is built is the one its jobs are sent with: what
    the job alone would be estimated to make, without reading the header again."""
    reads: list[int] = []
    real = tile_estimate.image_size
    monkeypatch.setattr(tile_estimate, "image_size", lambda data: reads.append(len(data)) or real(data))
    config = DvDConfig()
    parts = (image(photo_bytes("coffee")), image(b"garbage", max_tiles=6), video(b"clip", num_segments=2), "?")
    req = GenerationRequest.from_pb(pb.GenerateRequest(messages=[message("user", *parts)]), config)
    assert len(reads) == 2 and [p.tiles for p in req.media[:2]] == [7, None]
    tiled = tiled_jobs(req, config, group_images)
    assert len(reads) == 2
    monkeypatch.undo()
    assert [tiles for _, tiles in tiled] == [estimate_tiles(job) for job, _ in tiled]
