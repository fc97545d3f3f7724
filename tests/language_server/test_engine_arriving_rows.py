"""Image rows that arrive after their request entered the engine: the engine prefills as far as
the rows received allow, and the tokens equal transformers' whatever the parts' sizes."""

from __future__ import annotations

import torch

from language_server.engine.arriving_rows import ArrivingRows, Placement
from language_server.engine.sequence import EngineRequest
from pipeline.errors import DeadlineExceeded
from tests.language_server.conftest import Case, drive

ROWS_PER_STEP = 100  # rows of every unfinished request that arrive after each engine step


def _arriving(case: Case, image_token_id: int) -> ArrivingRows:
    positions = [i for i, t in enumerate(case.prompt_ids) if t == image_token_id]
    total = case.image_rows.shape[0]
    return ArrivingRows(torch.zeros_like(case.image_rows), [[Placement(0, 0, total)]], positions)


def test_rows_arriving_during_prefill_give_transformers_tokens(make_engine, mixed_cases, engine_lm):
    cases = [c for c in mixed_cases if c.image_rows is not None][:5]
    engine = make_engine(max_num_batched_tokens=512)
    arriving = {c.request_id: _arriving(c, engine_lm.image_token_id) for c in cases}
    for case in cases:
        arriving[case.request_id].put(0, 0, case.image_rows[:ROWS_PER_STEP])
    requests = [(0, EngineRequest(c.request_id, list(c.prompt_ids), c.request().params, arriving[c.request_id]))
                for c in cases]
    sequences = {}

    def after_step(step: int) -> None:
        for seq in engine.scheduler.running:
            sequences[seq.request_id] = seq
            rows = arriving[seq.request_id]
            if not rows.complete:
                assert seq.num_computed_tokens <= rows.ready_tokens(len(seq.prompt_ids))
                assert not seq.output_ids
        for case in cases:
            rows = arriving[case.request_id]
            received = rows.received[0]
            if received < case.image_rows.shape[0]:
                rows.put(0, received, case.image_rows[received : received + ROWS_PER_STEP])

    results = drive(engine, requests, on_step=after_step)
    for case in cases:
        assert results[case.request_id].token_ids == case.expected, case.request_id
    assert len(sequences) == len(cases)


def test_rows_that_will_not_arrive_fail_the_request_and_free_its_blocks(make_engine, mixed_cases, engine_lm):
    case = next(c for c in mixed_cases if c.image_rows is not None)
    engine = make_engine()
    rows = _arriving(case, engine_lm.image_token_id)
    request = EngineRequest(case.request_id, list(case.prompt_ids), case.request().params, rows)

    def after_step(step: int) -> None:
        if step == 2:
            assert engine.kv_blocks_used > 0  # its text before the image is in the cache
            rows.fail(DeadlineExceeded("the vision server did not send all of the features"))

    results = drive(engine, [(0, request)], on_step=after_step)
    error = results[case.request_id].error
    assert isinstance(error, DeadlineExceeded) and results[case.request_id].token_ids == []
    assert engine.kv_blocks_used == 0 and engine.num_running == 0
