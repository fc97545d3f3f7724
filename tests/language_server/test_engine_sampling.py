"""Seeded sampling through the engine: a request's tokens depend on its seed, not on its company."""

from __future__ import annotations

from dataclasses import replace

from tests.language_server.conftest import drive

SEEDED = dict(temperature=0.9, top_p=0.95, top_k=50, ignore_eos=True)


def test_seeded_requests_give_the_same_tokens_alone_and_in_a_busy_batch(make_engine, mixed_cases):
    seeded = {
        1: replace(mixed_cases[1], max_new_tokens=40).request(seed=1234, **SEEDED),
        7: mixed_cases[7].request(seed=7, **SEEDED),  # two images, 542 prompt tokens
        12: mixed_cases[12].request(seed=5, **SEEDED),
        5: mixed_cases[5].request(seed=99, temperature=1.3),
    }
    solo_engine = make_engine()
    alone = {i: drive(solo_engine, [(0, replace(r))])[r.request_id].token_ids for i, r in seeded.items()}

    # Busy: greedy company (one with a repetition penalty), a token budget that chunks the
    # prompts and a KV pool small enough that a seeded request is preempted mid-generation.
    engine = make_engine(num_kv_blocks=80, max_model_len=1280, max_num_batched_tokens=80)
    arrivals = [
        (0, mixed_cases[6].request()),
        (1, seeded[7]),
        (2, mixed_cases[2].request(repetition_penalty=1.3)),
        (3, seeded[1]),
        (4, seeded[12]),
        (5, mixed_cases[10].request()),
        (8, seeded[5]),
    ]
    preempted: set[str] = set()

    def watch(_: int) -> None:
        for seq in [*engine.scheduler.running, *engine.scheduler.waiting]:
            if seq.num_preemptions:
                preempted.add(seq.request_id)

    busy = drive(engine, arrivals, on_step=watch)

    for i, request in seeded.items():
        assert busy[request.request_id].error is None
        assert busy[request.request_id].token_ids == alone[i], request.request_id
    assert len(alone[1]) == 40
    # A preempted seeded request was recomputed without drawing extra random numbers.
    assert preempted & {r.request_id for r in seeded.values()}
    assert engine.scheduler.num_partial_prefills > 0


def test_different_seeds_give_different_tokens(make_engine, mixed_cases):
    case = mixed_cases[0]
    first, second = case.request(seed=1, **SEEDED), case.request(seed=2, **SEEDED)
    second.request_id = "other-seed"
    results = drive(make_engine(), [(0, first), (0, second)])
    assert results[case.request_id].token_ids != results["other-seed"].token_ids
