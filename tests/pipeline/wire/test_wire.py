"""Invariant 3: features travel as protobuf header + raw payload, and every frame is validated."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch

from pipeline.wire import (
    FeatureHeader,
    JobStatus,
    VisionJob,
    VisionTimings,
    WireError,
    decode_features,
    decode_header,
    encode_features,
    error_header,
)


def _encode(tensor: torch.Tensor, tiles: tuple[int, ...]) -> tuple[bytes, memoryview]:
    return encode_features(FeatureHeader(job_id="j1", request_id="r1", tile_tokens=tiles), tensor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact(dtype):
    tensor = torch.randn(512, 64).to(dtype)
    frame, payload = _encode(tensor, (256, 256))
    assert payload.nbytes == tensor.numel() * tensor.element_size()
    features = decode_features(decode_header(frame), payload, hidden_size=64)
    assert features.tensor.dtype == dtype
    assert torch.equal(features.tensor, tensor)


def test_header_fields_survive_the_wire():
    header = FeatureHeader(
        job_id="j1", request_id="r1", tile_tokens=(256, 64), frame_tiles=(2,), server_id="vision-0", cached_tiles=1,
        timings=VisionTimings(queue_ms=1.5, preprocess_ms=2.25, compute_ms=30.0, sent_unix_s=1.7e9),
    )
    frame, _ = encode_features(header, torch.zeros(320, 8, dtype=torch.bfloat16))
    decoded = decode_header(frame)
    assert decoded.timings == header.timings
    assert (decoded.tile_tokens, decoded.frame_tiles, decoded.server_id, decoded.cached_tiles) == ((256, 64), (2,), "vision-0", 1)


def test_payload_is_raw_bytes_not_pickle():
    tensor = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    frame, payload = _encode(tensor, (4,))
    assert bytes(payload) == tensor.numpy().tobytes()
    with pytest.raises(Exception):
        pickle.loads(frame)


def test_job_round_trip():
    job = VisionJob(job_id="j", request_id="r", kind="image", data=b"\x89PNG", reply_to="tcp://127.0.0.1:1",
                    max_tiles=6, start_s=None, vir_mode="all_64")
    assert VisionJob.decode(job.encode()) == job


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h: replace(h, dtype=None), "unknown dtype"),
        (lambda h: replace(h, shape=(4,)), "shape must be [rows, hidden]"),
        (lambda h: replace(h, payload_bytes=h.payload_bytes + 2), "payload_bytes"),
        (lambda h: replace(h, tile_tokens=(3,)), "rows 0..4 lie beyond the 3 rows"),
        (lambda h: replace(h, tile_tokens=(4, 2), row_offset=3), "rows 3..7 lie beyond the 6 rows"),
        (lambda h: replace(h, tile_tokens=(4, 0)), "must be positive"),
        (lambda h: replace(h, frame_tiles=(2,)), "frame tile counts sum to 2"),
        (lambda h: replace(h, tile_tokens=(2, 2), frame_tiles=(0, 2, 0)), "per-frame tile counts must be positive"),
    ],
)
def test_inconsistent_headers_are_rejected(mutate, message):
    tensor = torch.zeros(4, 2)
    frame, payload = _encode(tensor, (4,))
    header = mutate(decode_header(frame))
    with pytest.raises(WireError) as info:
        decode_features(header, payload)
    assert message in str(info.value)


def test_an_answer_in_parts_says_which_part_is_last():
    frame, payload = _encode(torch.zeros(4, 2), (4, 4, 2))
    first = decode_features(decode_header(frame), payload).header
    assert (first.total_rows, first.row_offset, first.is_last) == (10, 0, False)
    middle = FeatureHeader.from_pb(replace(first, row_offset=4).to_pb())
    assert (middle.row_offset, middle.is_last) == (4, False)
    last = replace(first, row_offset=6)
    assert last.is_last and decode_features(last, payload).tensor.shape == (4, 2)
    assert error_header("j", "r", JobStatus.INTERNAL, "failed").is_last


def test_payload_length_and_hidden_size_are_checked():
    frame, payload = _encode(torch.zeros(4, 2), (4,))
    header = decode_header(frame)
    with pytest.raises(WireError, match="payload is 30 bytes"):
        decode_features(header, payload[:30])
    with pytest.raises(WireError, match="hidden size 2 does not match the model's 64"):
        decode_features(header, payload, hidden_size=64)


def test_undecodable_and_incomplete_headers():
    with pytest.raises(WireError, match="undecodable"):
        decode_header(b"\xff\xff\xff\xff")
    with pytest.raises(WireError, match="without job_id"):
        decode_header(b"")
    with pytest.raises(WireError):
        VisionJob.decode(b"\x08\x63")


def test_error_headers_carry_no_payload():
    header = error_header("j", "r", JobStatus.INVALID_INPUT, "image too small")
    frame, payload = encode_features(header, None)
    decoded = decode_features(decode_header(frame), payload)
    assert decoded.tensor is None and decoded.header.error_message == "image too small"
    assert JobStatus.name(decoded.header.status) == "invalid_input"


def test_the_feature_size_limit_holds_the_largest_answer():
    from pipeline.wire import max_feature_bytes

    largest = torch.zeros(128 * 256, 64, dtype=torch.float32)  # 128 tiles of 256 rows
    frame, payload = _encode(largest, (256,) * 128)
    assert payload.nbytes == max_feature_bytes(128, 64)
    assert max_feature_bytes(128, 64) < max_feature_bytes(129, 64)
