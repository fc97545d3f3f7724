"""The batching engine computes what transformers computes: greedy float32 tokens equal those of
`InternVLForConditionalGeneration.generate` for 16 staggered requests, with images and without,
however the scheduler slices them (roomy limits, a KV pool small enough to preempt, a token
budget smaller than the prompts, everything small at once)."""

from __future__ import annotations

import pytest

from tests.language_server.conftest import drive

VARIANTS = {
    "roomy": {},
    "small_kv_pool": {"num_kv_blocks": 130, "max_model_len": 2080},  # 2080 tokens: the 1.8k-token request fits, not much beside it
    "small_token_budget": {"max_num_batched_tokens": 100},  # chunks end inside image spans
    "all_small": {
        "num_kv_blocks": 240, "block_size": 8, "max_model_len": 1920, "max_num_batched_tokens": 61, "max_num_seqs": 5
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sixteen_staggered_requests_equal_transformers_generate(variant, make_engine, mixed_cases, stop_ids, tokenizer):
    engine = make_engine(**VARIANTS[variant])
    running: list[int] = []
    arrivals = [(i, case.request(stop_token_ids=stop_ids)) for i, case in enumerate(mixed_cases)]
    results = drive(engine, arrivals, on_step=lambda _: running.append(engine.num_running))

    for case in mixed_cases:
        got = results[case.request_id]
        assert got.error is None, got.error
        assert got.token_ids == case.expected, case.request_id
        # One token per output, nothing re-sent after a preemption, nothing after the end.
        assert got.outputs == len(got.token_ids) and got.after_finish == 0
        assert got.text == tokenizer.decode(got.token_ids, skip_special_tokens=True)
    assert max(running) > 1  # requests really shared steps
    if "kv_pool" in variant or variant == "all_small":
        assert engine.num_preemptions > 0
    if "budget" in variant or variant == "all_small":
        assert engine.scheduler.num_partial_prefills > 0
    if variant == "roomy":
        assert engine.num_preemptions == 0
    if variant == "all_small":
        assert max(running) <= 5
