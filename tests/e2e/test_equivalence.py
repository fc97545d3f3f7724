"""Invariant 2: through two real server processes over gRPC, DvD computes what transformers computes."""

from __future__ import annotations

import pytest
import torch

from pipeline.client import sampling
from tests.conftest import TEST_DEVICE, photo_bytes
from tests.reference import Reference, img, text, to_messages

MAX_NEW_TOKENS = 12


def conversations() -> dict[str, list[dict]]:
    coffee, astronaut, chelsea, rocket = (photo_bytes(n) for n in ("coffee", "astronaut", "chelsea", "rocket"))
    return {
        "single_image": [{"role": "user", "content": [img(coffee), text("What is in this image?")]}],
        "two_images": [
            {"role": "user", "content": [img(astronaut), img(chelsea), text("Compare the two images.")]}
        ],
        "two_turns": [
            {"role": "user", "content": [img(rocket), text("Describe the picture.")]},
            {"role": "assistant", "content": [text("A rocket on a launch pad.")]},
            {"role": "user", "content": [text("What colour is it?")]},
        ],
        "text_only": [{"role": "user", "content": [text("Tell me a short story about a lighthouse.")]}],
    }


CASES = conversations()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers_generate(case, fp32_deployment, client_for, reference_fp32):
    conversation = CASES[case]
    expected = reference_fp32.generate(conversation, MAX_NEW_TOKENS)
    result = client_for(fp32_deployment).generate(
        to_messages(conversation), sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    )
    assert list(result.token_ids) == expected
    prompt_len = reference_fp32.inputs(conversation)["input_ids"].shape[1]
    assert result.usage.prompt_tokens == prompt_len


def test_streamed_deltas_add_up_to_the_result(fp32_deployment, client_for):
    conversation = CASES["single_image"]
    events = list(client_for(fp32_deployment).stream(to_messages(conversation), sampling(max_new_tokens=8)))
    deltas, final = events[:-1], events[-1]
    assert final.HasField("result") and all(e.HasField("delta") for e in deltas)
    assert "".join(e.delta.text for e in deltas) == final.result.text
    assert [t for e in deltas for t in e.delta.token_ids] == list(final.result.token_ids)
    assert final.result.usage.image_tiles == 7  # coffee (400x600): a 2x3 grid plus the thumbnail
    timings = final.result.timings
    assert 0 < timings.time_to_first_token_ms <= timings.total_ms
    assert timings.vision_compute_ms > 0 and timings.prefill_ms > 0


def test_different_photos_give_different_answers(fp32_deployment, client_for):
    client = client_for(fp32_deployment)
    answers = {
        name: list(
            client.generate(
                to_messages([{"role": "user", "content": [img(photo_bytes(name)), text("What is this?")]}]),
                sampling(max_new_tokens=8),
            ).token_ids
        )
        for name in ("astronaut", "chelsea")
    }
    assert answers["astronaut"] != answers["chelsea"]


def test_both_checkpoint_formats_give_identical_tokens(original_fp32_deployment, fp32_deployment, client_for):
    original = original_fp32_deployment
    for case in ("single_image", "two_turns"):
        messages = to_messages(CASES[case])
        params = sampling(max_new_tokens=MAX_NEW_TOKENS)
        from_hf = client_for(fp32_deployment).generate(messages, params)
        from_original = client_for(original).generate(messages, params)
        assert list(from_original.token_ids) == list(from_hf.token_ids)


@pytest.fixture(scope="module")
def streamed_deployment(start_deployment):
    """Encoder chunks of 3 tiles: every image of CASES is answered in parts, cut inside images."""
    return start_deployment(
        {"vision.max_batch_tiles": 3, "vision.dtype": "float32", "language.dtype": "float32"}, name="streamed"
    )


@pytest.mark.parametrize("case", ["single_image", "two_images", "two_turns"])
def test_features_answered_in_parts_give_transformers_tokens(case, streamed_deployment, client_for, reference_fp32):
    conversation = CASES[case]
    result = client_for(streamed_deployment).generate(
        to_messages(conversation), sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    )
    assert list(result.token_ids) == reference_fp32.generate(conversation, MAX_NEW_TOKENS)
    assert result.timings.vision_compute_ms > 0 and result.timings.transfer_ms >= 0


@pytest.fixture(scope="module")
def bf16_deployment(start_deployment):
    return start_deployment({"vision.dtype": "bfloat16", "language.dtype": "bfloat16"}, name="bf16")


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_prefill_logits_match_transformers(case, bf16_deployment, client_for, tiny_dirs):
    reference = _bf16_reference(tiny_dirs)
    conversation = CASES[case]
    expected = reference.prefill_logprobs(conversation)
    result = client_for(bf16_deployment).generate(
        to_messages(conversation), sampling(max_new_tokens=1, top_logprobs=20)
    )
    top = result.logprobs[0].top
    ids = torch.tensor([t.token_id for t in top])
    got = torch.tensor([t.logprob for t in top])
    # Log-probabilities equal to well under bf16 resolution at these magnitudes (~0.1), and no token
    # the server left out of its top 20 is more likely than its 20th.
    tolerance = 0.02
    torch.testing.assert_close(got, expected[ids], atol=tolerance, rtol=0.0)
    left_out = torch.ones_like(expected, dtype=torch.bool)
    left_out[ids] = False
    assert expected[left_out].max() <= got.min() + tolerance


_BF16: dict[str, Reference] = {}


def _bf16_reference(tiny_dirs) -> Reference:
    if "ref" not in _BF16:
        _BF16["ref"] = Reference(tiny_dirs["hf"], torch.bfloat16, TEST_DEVICE)
    return _BF16["ref"]
