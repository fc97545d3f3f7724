"""The load generator's summary numbers, on runs with known send and completion times."""

from __future__ import annotations

import math

from benchmarks.load import LoadResult, RequestRecord, summarize


def closed_loop(done_times: list[float], concurrency: int, started: float = 0.0) -> LoadResult:
    """A finished closed-loop run whose k-th completion (in time) is at done_times[k]."""
    records = [RequestRecord(sent=started, first_token=t, done=t) for t in done_times]
    return LoadResult(records=records, started=started, finished=max(done_times), first_wave=concurrency)


def test_steady_throughput_leaves_out_fill_and_drain() -> None:
    # 2 workers, 10 requests: a slow start (first completion at 5 s), one completion a second
    # while both workers are busy, then a long drain.
    done = [5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 20.0, 30.0]
    summary = summarize([closed_loop(done, concurrency=2)])
    assert summary["request_throughput"] == 10 / 30
    # between the 2nd completion (6 s) and the 8th (12 s, when the last request is sent)
    assert summary["steady_request_throughput"] == 6 / 6


def test_steady_throughput_pools_runs_by_summing_their_windows() -> None:
    fast = closed_loop([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], concurrency=1)  # 4 completions in 4 s
    slow = closed_loop([2.0, 4.0, 6.0, 8.0, 10.0, 12.0], concurrency=1)  # 4 completions in 8 s
    assert summarize([fast, slow])["steady_request_throughput"] == 8 / 12


def test_steady_throughput_is_undefined_for_open_loops_and_failed_runs() -> None:
    open_loop = closed_loop([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], concurrency=0)
    assert math.isnan(summarize([open_loop])["steady_request_throughput"])
    failed = closed_loop([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], concurrency=1)
    failed.records[3].error = "UNAVAILABLE: gone"
    assert math.isnan(summarize([failed])["steady_request_throughput"])
    too_short = closed_loop([1.0, 2.0, 3.0, 4.0], concurrency=2)
    assert math.isnan(summarize([too_short])["steady_request_throughput"])


def test_span_means_come_from_the_final_responses_timings() -> None:
    from proto.dvd.v1 import generate_pb2 as pb

    run = closed_loop([1.0, 2.0, 3.0], concurrency=1)
    run.records[0].timings = pb.Timings(vision_compute_ms=300.0, prefill_ms=100.0, decode_ms=900.0)
    run.records[1].timings = pb.Timings(vision_compute_ms=500.0, prefill_ms=300.0, decode_ms=1100.0)
    run.records[2].error = "RESOURCE_EXHAUSTED: full"  # failed requests do not count
    summary = summarize([run])
    assert summary["vision_compute_mean_s"] == 0.4
    assert summary["prefill_mean_s"] == 0.2
    assert summary["decode_mean_s"] == 1.0
    assert summary["vision_queue_mean_s"] == 0.0


def test_span_means_are_undefined_without_timings() -> None:
    summary = summarize([closed_loop([1.0, 2.0], concurrency=1)])
    assert math.isnan(summary["prefill_mean_s"])


def test_run_load_refuses_a_rate_or_concurrency_that_sends_nothing() -> None:
    import asyncio

    import pytest

    from benchmarks.load import run_load

    for load in ({"rate": 0.0}, {"concurrency": 0}):
        with pytest.raises(ValueError, match="rate must be > 0"):
            asyncio.run(run_load("127.0.0.1:9", lambda i: None, 1, **load))


def test_fixed_rate_requests_are_timed_from_their_scheduled_arrival() -> None:
    """Open loop: a request's clock starts at its Poisson arrival, even if the client starts it late."""
    import asyncio
    import math
    import random

    from benchmarks.load import run_load

    from proto.dvd.v1 import generate_pb2 as pb

    result = asyncio.run(run_load("127.0.0.1:9", lambda i: pb.GenerateRequest(), 5, rate=1000.0, seed=3, timeout_s=10))
    rng = random.Random(3)
    gaps = [rng.expovariate(1000.0) for _ in range(4)]
    sent = [r.sent for r in result.records]
    assert all(math.isclose(b - a, gap, abs_tol=1e-9) for a, b, gap in zip(sent, sent[1:], gaps))
    assert all(r.error for r in result.records)  # nothing listens on the discard port


def test_server_cpu_is_pooled_over_the_runs_wall_time() -> None:
    first = closed_loop([1.0, 2.0, 3.0, 4.0], concurrency=1)  # 4 s
    first.server_cpu_s = {"vision-0": 2.0, "language": 4.0}
    second = closed_loop([2.0, 4.0, 6.0], concurrency=1)  # 6 s
    second.server_cpu_s = {"vision-0": 3.0, "language": 5.0}
    summary = summarize([first, second])
    assert summary["vision-0_cpu_cores"] == 5.0 / 10
    assert summary["language_cpu_cores"] == 9.0 / 10
    assert not any(key.endswith("_cpu_cores") for key in summarize([closed_loop([1.0], concurrency=1)]))


def test_engine_steps_are_pooled_into_the_mean_decode_batch() -> None:
    first = closed_loop([1.0, 2.0], concurrency=1)
    first.engine_counters = {"dvd_engine_steps_total": 12.0, "dvd_engine_sampling_steps_total": 10.0,
                             "dvd_engine_sampled_tokens_total": 30.0}
    second = closed_loop([1.0, 2.0], concurrency=1)
    second.engine_counters = {"dvd_engine_steps_total": 6.0, "dvd_engine_sampling_steps_total": 5.0,
                              "dvd_engine_sampled_tokens_total": 30.0}
    summary = summarize([first, second, closed_loop([1.0], concurrency=1)])  # the last one was not counted
    assert summary["llm_steps"] == 18.0
    assert summary["llm_decode_batch"] == 60.0 / 15.0
    assert "llm_decode_batch" not in summarize([closed_loop([1.0], concurrency=1)])


def test_vir_decisions_are_pooled_into_the_compressed_share() -> None:
    first = closed_loop([1.0, 2.0], concurrency=1)
    first.vir_tiles = {"256": 6.0, "64": 4.0}
    second = closed_loop([1.0, 2.0], concurrency=1)
    second.vir_tiles = {"256": 3.0, "64": 7.0}
    summary = summarize([first, second, closed_loop([1.0], concurrency=1)])
    assert (summary["vir_tiles"], summary["vir_compressed_tiles"], summary["vir_compressed_fraction"]) == (20.0, 11.0, 0.55)
    assert "vir_compressed_fraction" not in summarize([closed_loop([1.0], concurrency=1)])
