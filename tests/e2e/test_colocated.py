"""The colocated baseline serves the same API from one process and computes the same answers."""

from __future__ import annotations

import grpc
import pytest

from pipeline.client import image, message, sampling
from proto.dvd.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import photo_bytes
from tests.e2e.test_equivalence import CASES, MAX_NEW_TOKENS
from tests.reference import to_messages


@pytest.fixture(scope="module")
def colocated(start_deployment):
    return start_deployment(
        {"mode": "colocated", "vision.dtype": "float32", "language.dtype": "float32", "vision.feature_cache_bytes": 0},
        name="colocated",
    )


@pytest.mark.parametrize("case", ["single_image", "two_images", "two_turns"])
def test_colocated_tokens_equal_decoupled_tokens(case, colocated, fp32_deployment, client_for):
    messages, params = to_messages(CASES[case]), sampling(max_new_tokens=MAX_NEW_TOKENS)
    decoupled = client_for(fp32_deployment).generate(messages, params)
    inline = client_for(colocated).generate(messages, params)
    assert list(inline.token_ids) == list(decoupled.token_ids)
    assert inline.usage == decoupled.usage


def test_one_process_holds_both_halves(colocated):
    assert [s.name for s in colocated.servers] == ["colocated"]
    with grpc.insecure_channel(colocated.address) as channel:
        info = admin_pb2_grpc.AdminStub(channel).GetServerInfo(admin_pb2.GetServerInfoRequest(), timeout=30)
    assert info.role == "colocated"
    assert any(n.startswith(("vision_tower.", "model.vision_tower.")) for n in info.loaded_tensors)
    assert any(n.startswith(("language_model.", "model.language_model.")) for n in info.loaded_tensors)


def test_colocated_bad_image_is_invalid_argument(colocated, client_for):
    client = client_for(colocated)
    with pytest.raises(grpc.RpcError) as info:
        client.generate([message("user", image(b"not an image at all"), "?")], sampling(max_new_tokens=2))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    good = client.generate([message("user", image(photo_bytes("chelsea")), "?")], sampling(max_new_tokens=2))
    assert len(good.token_ids) == 2


def test_colocated_timings_split_vision_from_prefill(colocated, client_for):
    result = client_for(colocated).generate(
        [message("user", image(photo_bytes("coffee")), "?")], sampling(max_new_tokens=2)
    )
    timings = result.timings
    assert timings.vision_compute_ms > 0 and timings.transfer_ms == 0
    assert timings.prefill_ms < timings.time_to_first_token_ms - timings.vision_compute_ms + 1.0


def test_colocated_refuses_a_prompt_too_long_before_encoding_its_image(colocated, client_for):
    long_text = "lorem ipsum " * 5000  # about 10k tokens against max_model_len 8192
    with pytest.raises(grpc.RpcError) as info:
        client_for(colocated).generate(
            [message("user", image(photo_bytes("chelsea")), long_text)], sampling(max_new_tokens=2)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "before its images" in info.value.details()
