"""vision_server.worker: the socket-free pipeline - batching invariance, agreement with transformers,
per-job errors and limits, the feature cache."""

from __future__ import annotations

import io
import time

import pytest
import torch
from PIL import Image

from pipeline.wire import JobStatus, VisionJob
from tests.conftest import photo_bytes
from tests.vision_server.conftest import vision_config
from vision_server.worker import VisionWorker

PHOTOS = ("coffee", "astronaut", "chelsea")


def job(name: str, data: bytes, kind: str = "image", **fields) -> VisionJob:
    return VisionJob(job_id=name, request_id="r", kind=kind, data=data, reply_to="unused", **fields)


@pytest.fixture(scope="module")
def solo(worker) -> dict[str, torch.Tensor]:
    """Each photo encoded on its own (a batch of one job)."""
    out = {}
    for name in PHOTOS:
        ((header, rows),) = worker.encode([job(name, photo_bytes(name))])
        assert header.ok
        out[name] = rows
    return out


def test_features_equal_transformers_get_image_features(solo, tiny_dirs):
    from transformers import InternVLForConditionalGeneration

    from pipeline.model.tiny_processors import build_image_processor

    model = InternVLForConditionalGeneration.from_pretrained(tiny_dirs["hf"], dtype=torch.float32).eval()
    processor = build_image_processor()
    for name in ("coffee", "astronaut"):
        pixels = processor(images=[Image.open(io.BytesIO(photo_bytes(name)))], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            expected = model.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(solo[name], expected.reshape(-1, expected.shape[-1]), atol=1e-5, rtol=1e-5)


def test_an_image_is_encoded_identically_alone_and_in_a_mixed_batch(worker, solo):
    order = ("chelsea", "astronaut", "coffee")
    mixed = [job(f"{name}-{i}", photo_bytes(name)) for i, name in enumerate(order)]
    answers = worker.encode(mixed)
    assert len({h.job_id for h, _ in answers}) == len(order)
    for (header, rows), name in zip(answers, order):
        assert header.ok and header.job_id.startswith(name)
        assert torch.equal(rows, solo[name])  # bit-identical in float32
        assert rows.shape[0] == sum(header.tile_tokens) == 256 * len(header.tile_tokens)


def test_batches_are_bounded_by_max_batch_tiles_and_results_do_not_change(solo):
    small = VisionWorker(vision_config(**{"vision.max_batch_tiles": 3}))
    try:
        answers = small.encode([job(n, photo_bytes(n)) for n in ("coffee", "astronaut")])
    finally:
        small.close()
    for (header, rows), name in zip(answers, ("coffee", "astronaut")):
        assert header.ok and torch.equal(rows, solo[name])


def test_jobs_spanning_encoder_chunks_are_answered_chunk_by_chunk(solo):
    """With an `on_part` sink, each chunk's finished tiles leave before the next chunk encodes;
    the parts and the final answer join into exactly the rows of an answer in one piece."""
    small = VisionWorker(vision_config(**{"vision.max_batch_tiles": 3}))
    parts = []
    try:
        names = ("coffee", "astronaut", "chelsea")  # 7, 1 and 7 tiles: chunks of 3 cut through coffee and chelsea
        prepared = [small.prepare(job(n, photo_bytes(n))) for n in names]
        results = small.run_batch(prepared, on_part=parts.append)
    finally:
        small.close()
    for result, name in zip(results, names):
        mine = [p for p in parts if p.job.job_id == name] + [result]
        headers = [p.header for p in mine]
        assert len(mine) == (1 if name == "astronaut" else 3) and all(h.ok for h in headers)
        assert {h.tile_tokens for h in headers} == {result.header.tile_tokens}  # every part gives the whole layout
        offsets = [h.row_offset for h in headers]
        assert offsets == [0] + [sum(p.rows.shape[0] for p in mine[:i]) for i in range(1, len(mine))]
        assert [h.is_last for h in headers] == [False] * (len(mine) - 1) + [True]
        assert torch.equal(torch.cat([p.rows for p in mine]), solo[name])


def test_an_encoder_failure_fails_its_job_and_jobs_that_already_sent_parts(solo):
    """A batch whose encoder run fails is run again job by job: only the faulty job fails, and any
    job that had already sent parts of its answer (its answer cannot start over)."""
    small = VisionWorker(vision_config(**{"vision.max_batch_tiles": 3}))
    names = ("coffee", "astronaut", "chelsea")  # 7, 1 and 7 tiles: coffee's first 6 leave before astronaut's chunk
    parts = []
    try:
        prepared = [small.prepare(job(n, photo_bytes(n))) for n in names]
        faulty = prepared[1].pixels[0].clone()
        vit_grid = small.encoder.vit_grid

        def failing(chunk: torch.Tensor) -> torch.Tensor:
            if any(torch.equal(tile, faulty) for tile in chunk):
                raise RuntimeError("the encoder fails on this input")
            return vit_grid(chunk)

        small.encoder.vit_grid = failing
        streamed = small.run_batch(prepared, on_part=parts.append)
        whole = small.run_batch([small.prepare(job(n, photo_bytes(n))) for n in names])
    finally:
        small.close()
    assert [r.header.status for r in whole] == [JobStatus.OK, JobStatus.INTERNAL, JobStatus.OK]
    assert torch.equal(whole[0].rows, solo["coffee"]) and torch.equal(whole[2].rows, solo["chelsea"])
    assert [r.header.status for r in streamed] == [JobStatus.INTERNAL, JobStatus.INTERNAL, JobStatus.OK]
    assert {r.header.error_message for r in streamed[:2]} == {"the vision encoder failed on this input"}
    chelsea = [p.rows for p in parts if p.job.job_id == "chelsea"] + [streamed[2].rows]
    assert torch.equal(torch.cat(chelsea), solo["chelsea"])


def test_a_bad_job_fails_alone_inside_a_batch(worker, solo):
    jobs = [
        job("good-1", photo_bytes("coffee")),
        job("corrupt", b"\xff\xd8\xff\xe0 not a jpeg at all" * 10),
        job("good-2", photo_bytes("astronaut")),
        job("bmp", _bmp()),
    ]
    answers = {h.job_id: (h, rows) for h, rows in worker.encode(jobs)}
    assert answers["corrupt"][0].status == JobStatus.INVALID_INPUT and answers["corrupt"][1] is None
    assert "JPEG" in answers["corrupt"][0].error_message
    assert answers["bmp"][0].status == JobStatus.INVALID_INPUT and "BMP" in answers["bmp"][0].error_message
    assert torch.equal(answers["good-1"][1], solo["coffee"])
    assert torch.equal(answers["good-2"][1], solo["astronaut"])


@pytest.mark.parametrize(
    ("overrides", "fields", "data", "message"),
    [
        ({"images.max_tiles_per_request": 5}, {}, "coffee", "7 tiles exceed the limit of 5 tiles per request"),
        ({"images.max_image_pixels": 100_000}, {}, "coffee", "over the limit of 100000"),
        ({"images.max_image_bytes": 1000}, {}, "coffee", "over the limit of 1000"),
        ({}, {"max_tiles": 13}, "coffee", "max_tiles 13 exceeds the server limit 12"),
        ({}, {"kind": "video", "max_tiles": 5}, "coffee", "5 tiles per frame exceed the server limit 4"),
        ({}, {"kind": "video", "max_tiles": 1, "num_segments": 65}, "coffee", "num_segments must be in 1..64"),
        ({}, {"kind": "video", "max_tiles": 1}, "coffee", "not a readable video"),
    ],
)
def test_limits_are_answered_as_invalid_input(worker, overrides, fields, data, message):
    limited = VisionWorker(vision_config(**overrides)) if overrides else None
    try:
        target = limited or worker
        ((header, rows),) = target.encode([job("j", photo_bytes(data), **fields)])
    finally:
        if limited is not None:
            limited.close()
    assert header.status == JobStatus.INVALID_INPUT and rows is None
    assert message in header.error_message


def test_an_expired_job_is_not_encoded(worker):
    expired = job("late", photo_bytes("coffee"), deadline_unix_s=time.time() - 1)
    ((header, rows),) = worker.encode([expired])
    assert header.status == JobStatus.DEADLINE_EXCEEDED and rows is None


def test_feature_cache_answers_repeats_without_the_encoder(solo):
    cached = VisionWorker(vision_config(**{"vision.feature_cache_bytes": 8 * 1024 * 1024}))
    try:
        data = photo_bytes("coffee")
        ((first, rows1),) = cached.encode([job("a", data)])
        encoder_calls = _count_calls(cached.encoder)
        ((second, rows2),) = cached.encode([job("b", data)])
        ((third, _),) = cached.encode([job("c", data, max_tiles=6)])  # other tiling: a new entry
        assert (first.cached_tiles, second.cached_tiles, third.cached_tiles) == (0, 7, 0)
        assert encoder_calls() == 1  # only the differently tiled job ran the ViT
        assert second.job_id == "b" and second.tile_tokens == first.tile_tokens
        assert torch.equal(rows2, rows1) and torch.equal(rows1, solo["coffee"])
        assert len(cached.cache) == 2
    finally:
        cached.close()


def _count_calls(module: torch.nn.Module):
    calls = []
    module.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    return lambda: len(calls)


def _bmp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "BMP")
    return buffer.getvalue()
