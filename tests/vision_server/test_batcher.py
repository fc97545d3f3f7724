"""vision_server.batcher: packing whole jobs under the tile budget, and the wait policy."""

from __future__ import annotations

import threading
import time

import torch

from pipeline.wire import VisionJob
from vision_server.batcher import TileBatcher, pack_batches
from vision_server.jobs import PreparedJob


def prepared(name: str, tiles: int) -> PreparedJob:
    job = VisionJob(job_id=name, request_id="r", kind="image", data=b"x", reply_to="unused")
    return PreparedJob(job=job, arrived=time.time(), pixels=torch.zeros(tiles, 3, 1, 1))


def names(batch: list[PreparedJob]) -> list[str]:
    return [p.job.job_id for p in batch]


def test_pack_batches_keeps_order_and_budget():
    jobs = [prepared("a", 7), prepared("b", 1), prepared("c", 13), prepared("d", 4), prepared("e", 4)]
    assert [names(b) for b in pack_batches(jobs, 8)] == [["a", "b"], ["c"], ["d", "e"]]
    assert [names(b) for b in pack_batches(jobs, 1)] == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert [names(b) for b in pack_batches(jobs, 64)] == [["a", "b", "c", "d", "e"]]
    assert pack_batches([], 8) == []


def test_a_full_budget_is_handed_out_at_once():
    batcher = TileBatcher(max_batch_tiles=8, max_wait_ms=30_000)
    for job in (prepared("a", 3), prepared("b", 5), prepared("c", 2)):
        batcher.put(job)
    started = time.monotonic()
    assert names(batcher.next_batch(timeout_s=60)) == ["a", "b"]
    assert time.monotonic() - started < 5  # far below max_wait_ms: the budget was full
    assert len(batcher) == 1 and batcher.queued_tiles == 2


def test_a_partial_batch_waits_max_wait_ms_then_runs():
    batcher = TileBatcher(max_batch_tiles=64, max_wait_ms=300)
    started = time.monotonic()  # before put: the wait counts from the job's ready time, set in put
    batcher.put(prepared("a", 2))
    assert names(batcher.next_batch(timeout_s=60)) == ["a"]
    assert time.monotonic() - started >= 0.3


def test_jobs_arriving_during_the_wait_join_the_batch():
    batcher = TileBatcher(max_batch_tiles=4, max_wait_ms=30_000)
    batcher.put(prepared("a", 1))
    result: list[list[PreparedJob]] = []
    taker = threading.Thread(target=lambda: result.append(batcher.next_batch(timeout_s=60)))
    taker.start()
    for name in ("b", "c", "d"):
        batcher.put(prepared(name, 1))
    taker.join(60)
    assert not taker.is_alive() and names(result[0]) == ["a", "b", "c", "d"]


def test_an_oversized_job_is_a_batch_of_its_own_and_empty_queue_times_out():
    batcher = TileBatcher(max_batch_tiles=4, max_wait_ms=0)
    batcher.put(prepared("big", 13))
    batcher.put(prepared("small", 1))
    assert names(batcher.next_batch(timeout_s=60)) == ["big"]
    assert names(batcher.next_batch(timeout_s=60)) == ["small"]
    started = time.monotonic()
    assert batcher.next_batch(timeout_s=0.05) == []
    assert time.monotonic() - started < 5
