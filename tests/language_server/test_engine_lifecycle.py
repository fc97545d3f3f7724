"""Requests coming and going: aborts free KV blocks at once, `prepare` runs on the engine thread
right before first scheduling, bad requests fail alone, limits hold, the thread and asyncio
faces work."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest
import torch

from language_server.engine.async_engine import AsyncEngine
from language_server.engine.sequence import EngineRequest, Sequence
from pipeline.errors import InvalidRequest
from tests.language_server.conftest import Collected, drive

WAIT_S = 60.0


def _seq(engine, request_id: str) -> Sequence:
    return next(s for s in [*engine.scheduler.running, *engine.scheduler.waiting] if s.request_id == request_id)


def test_abort_frees_blocks_at_once_wherever_the_request_is(make_engine, mixed_cases):
    engine = make_engine(max_num_batched_tokens=64, max_num_seqs=2)
    prefilling, decoding, waiting = mixed_cases[3], mixed_cases[5], mixed_cases[0]  # 1807, ~20, ~20 tokens
    sinks = {c.request_id: Collected() for c in (prefilling, decoding, waiting)}
    handles = {decoding.request_id: engine.add_request(decoding.request(ignore_eos=True), sinks[decoding.request_id])}
    engine.step()
    handles[prefilling.request_id] = engine.add_request(prefilling.request(), sinks[prefilling.request_id])
    handles[waiting.request_id] = engine.add_request(waiting.request(), sinks[waiting.request_id])
    for _ in range(4):
        engine.step()
    long_seq, short_seq = _seq(engine, prefilling.request_id), _seq(engine, decoding.request_id)
    assert 0 < long_seq.num_computed_tokens < len(long_seq.prompt_ids)  # mid-prefill
    assert short_seq.output_ids  # decoding
    assert engine.num_waiting == 1 and engine.num_running == 2

    engine.abort(handles[waiting.request_id])
    assert engine.num_waiting == 0
    engine.abort(handles[prefilling.request_id])
    assert engine.kv_blocks_used == len(short_seq.block_table) > 0
    engine.step()
    received = sinks[decoding.request_id].outputs
    engine.abort(handles[decoding.request_id])
    assert engine.kv_blocks_used == 0 and engine.num_running == 0
    engine.step()
    assert sinks[decoding.request_id].outputs == received
    assert sinks[prefilling.request_id].outputs == 0 and sinks[waiting.request_id].outputs == 0


def test_aborted_requests_do_not_disturb_the_others(make_engine, mixed_cases, stop_ids):
    engine = make_engine(num_kv_blocks=200, max_model_len=3200, max_num_batched_tokens=128)
    cases = mixed_cases[:8]
    aborts = {2: cases[1].request_id, 5: cases[4].request_id, 9: cases[7].request_id}
    kept = [c for c in cases if c.request_id not in aborts.values()]
    # `drive` waits for every request to finish; aborted ones never do, so step by hand.
    results: dict[str, Collected] = {}
    handles: dict[str, int] = {}
    for step in range(20_000):
        if step < len(cases):
            results[cases[step].request_id] = Collected()
            request = cases[step].request(stop_token_ids=stop_ids)
            handles[request.request_id] = engine.add_request(request, results[request.request_id])
        elif all(results[c.request_id].finished for c in kept):
            break
        engine.step()
        if step in aborts:
            engine.abort(handles[aborts[step]])
    for case in kept:
        assert results[case.request_id].token_ids == case.expected
    for request_id in aborts.values():
        assert not results[request_id].finished


def test_prepare_runs_right_before_the_request_is_first_scheduled(make_engine, mixed_cases, stop_ids):
    engine = make_engine(max_num_seqs=1)
    first, second = mixed_cases[2], mixed_cases[1]
    calls: list[int] = []

    def prepare():
        calls.append(engine.num_running)
        return second.prompt_ids, second.image_rows

    late = EngineRequest(second.request_id, [], second.request(stop_token_ids=stop_ids).params, prepare=prepare)
    results = {first.request_id: Collected(), second.request_id: Collected()}
    engine.add_request(first.request(stop_token_ids=stop_ids), results[first.request_id])
    engine.add_request(late, results[second.request_id])
    for _ in range(20_000):
        if results[second.request_id].finished:
            break
        engine.step()
        if not results[first.request_id].finished:
            assert calls == []  # the only slot is taken: not scheduled, not prepared
    assert calls == [0]  # once, when the slot came free
    assert results[first.request_id].token_ids == first.expected
    assert results[second.request_id].token_ids == second.expected
    assert results[second.request_id].finish_reason is not None


def test_prepare_runs_on_the_engine_thread_and_its_failure_fails_only_its_request(make_engine, mixed_cases, stop_ids):
    engine = make_engine()
    engine.start()
    threads: list[str] = []
    broken = RuntimeError("vision failed")

    def prepare():
        threads.append(threading.current_thread().name)
        return mixed_cases[1].prompt_ids, mixed_cases[1].image_rows

    def fail():
        raise broken

    params = mixed_cases[1].request(stop_token_ids=stop_ids).params
    requests = [
        EngineRequest("prepared", [], params, prepare=prepare),
        EngineRequest("broken", [], params, prepare=fail),
        mixed_cases[4].request(stop_token_ids=stop_ids),
    ]
    done = {r.request_id: threading.Event() for r in requests}
    results = {r.request_id: Collected() for r in requests}

    def sink_for(request_id: str):
        def sink(output):
            results[request_id](output)
            if output.finished:
                done[request_id].set()

        return sink

    for request in requests:
        engine.add_request(request, sink_for(request.request_id))
    for event in done.values():
        assert event.wait(WAIT_S)
    assert threads == ["engine"]
    assert results["prepared"].token_ids == mixed_cases[1].expected
    assert results["broken"].error is broken and results["broken"].token_ids == []
    assert results[mixed_cases[4].request_id].token_ids == mixed_cases[4].expected


def test_requests_that_cannot_run_fail_alone(make_engine, mixed_cases, stop_ids):
    engine = make_engine(num_kv_blocks=40, max_model_len=1000, unchecked=True)
    with_image = mixed_cases[1]
    bad = {
        "rows_missing": EngineRequest("rows_missing", with_image.prompt_ids, with_image.request().params, None),
        "rows_extra": EngineRequest(
            "rows_extra", with_image.prompt_ids, with_image.request().params, torch.zeros(300, 64)
        ),
        "rows_too_narrow": EngineRequest(
            "rows_too_narrow", with_image.prompt_ids, with_image.request().params, with_image.image_rows[:, :32]
        ),
        "too_long_for_the_model": EngineRequest("too_long_for_the_model", [5] * 1000, with_image.request().params),
        "too_long_for_the_pool": EngineRequest("too_long_for_the_pool", [5] * 700, with_image.request().params),
        "empty": EngineRequest("empty", [], with_image.request().params),
    }
    good = mixed_cases[1].request(stop_token_ids=stop_ids)
    results = drive(engine, [(0, r) for r in bad.values()] + [(1, good)])
    for name in ("rows_missing", "rows_extra", "rows_too_narrow"):  # the caller's fault: INTERNAL
        assert isinstance(results[name].error, ValueError), name
    for name in ("too_long_for_the_model", "too_long_for_the_pool", "empty"):  # the client's: INVALID_ARGUMENT
        assert isinstance(results[name].error, InvalidRequest), name
    assert "feature rows" in str(results["rows_missing"].error)
    assert "pool has 40" in str(results["too_long_for_the_pool"].error)
    assert results[good.request_id].token_ids == mixed_cases[1].expected


def test_a_sequence_that_outgrows_the_kv_pool_finishes_with_length(make_engine, mixed_cases):
    engine = make_engine(num_kv_blocks=4, block_size=16, max_model_len=1000, unchecked=True)  # 64 tokens
    case = mixed_cases[0]
    request = replace(case, max_new_tokens=200).request(ignore_eos=True)
    results = drive(engine, [(0, request)])
    got = results[case.request_id]
    assert got.error is None and got.finish_reason == "length"
    assert len(case.prompt_ids) + len(got.token_ids) == 64 + 1  # every slot used, and a last token sampled
    assert engine.num_preemptions == 1


def test_requests_sharing_a_request_id_are_independent(make_engine, mixed_cases, stop_ids):
    """The client picks request_id; the engine keys requests by its own handle. A second request
    reusing a running request's id, cancelled before the engine even read it, must not abort the
    first, and two requests with one id both complete."""
    engine = make_engine()
    case = mixed_cases[0]
    first, cancelled, twin = Collected(), Collected(), Collected()
    engine.add_request(case.request(stop_token_ids=stop_ids), first)
    for _ in range(3):
        engine.step()
    assert engine.num_running == 1 and not first.finished
    engine.abort(engine.add_request(case.request(stop_token_ids=stop_ids), cancelled))
    engine.add_request(case.request(stop_token_ids=stop_ids), twin)
    for _ in range(1000):
        if first.finished and twin.finished:
            break
        engine.step()
    assert first.error is None and first.token_ids == case.expected
    assert twin.error is None and twin.token_ids == case.expected
    assert cancelled.outputs == 0
    assert engine.kv_blocks_used == 0


def test_max_num_seqs_bounds_the_running_set(make_engine, mixed_cases, stop_ids):
    engine = make_engine(max_num_seqs=3)
    running: list[int] = []
    arrivals = [(0, case.request(stop_token_ids=stop_ids)) for case in mixed_cases[:8]]
    results = drive(engine, arrivals, on_step=lambda _: running.append(engine.num_running))
    assert max(running) == 3
    assert all(results[c.request_id].token_ids == c.expected for c in mixed_cases[:8])


def test_async_consumers_on_the_engine_thread_and_a_cancelled_one(make_engine, mixed_cases, stop_ids):
    engine = make_engine()
    engine.start()
    async_engine = AsyncEngine(engine)

    async def consume(request: EngineRequest, stop_after: int | None = None) -> list[int]:
        tokens: list[int] = []
        async for output in async_engine.generate(request):
            tokens += output.token_ids
            if stop_after is not None and len(tokens) >= stop_after:
                break  # leaving the iterator aborts the request
        return tokens

    async def main() -> list[list[int]]:
        cancelled = replace(mixed_cases[8], max_new_tokens=500).request(ignore_eos=True)
        jobs = [consume(c.request(stop_token_ids=stop_ids)) for c in mixed_cases[:3]]
        jobs.append(consume(cancelled, stop_after=2))
        return await asyncio.wait_for(asyncio.gather(*jobs), WAIT_S)

    outputs = asyncio.run(main())
    for case, tokens in zip(mixed_cases[:3], outputs):
        assert tokens == case.expected
    assert len(outputs[3]) == 2
    engine.stop()  # joins the thread, then applies the abort if the thread had not yet
    assert engine.kv_blocks_used == 0


def test_auto_backend_is_sdpa_on_cpu_and_flash_attn_is_refused_here(make_engine):
    from language_server.engine.flash_backend import flash_attn_available

    assert make_engine(attn_backend="auto").backend.name == "sdpa"
    if not flash_attn_available():
        with pytest.raises(ValueError, match="flash_attn"):
            make_engine(attn_backend="flash_attn")


def test_step_counters_count_each_step_and_each_sampled_token(make_engine, mixed_cases):
    """What /metrics reports as steps, sampling steps and sampled tokens (their ratio is the mean
    decode batch): a 300-token prompt prefilled in 64-token chunks runs steps that sample nothing."""
    engine = make_engine(max_num_batched_tokens=64)
    story, short = mixed_cases[2], mixed_cases[0]  # ~300 and ~20 prompt tokens
    sinks = {c.request_id: Collected() for c in (story, short)}
    for case, new in ((story, 5), (short, 3)):
        engine.add_request(replace(case, max_new_tokens=new).request(ignore_eos=True), sinks[case.request_id])
    steps = sampling_steps = sampled = 0
    while not all(s.finished for s in sinks.values()):
        assert steps < 100, "requests unfinished after 100 steps"
        outputs = engine.step()
        steps += 1
        sampling_steps += bool(outputs)
        sampled += len(outputs)
    assert sampled == 5 + 3 == sum(len(s.token_ids) for s in sinks.values())
    counts = engine.step_counts
    assert (counts.steps, counts.sampling_steps, counts.sampled_tokens) == (steps, sampling_steps, sampled)
    assert steps > sampling_steps  # the chunks of the long prompt that stop short of its end
