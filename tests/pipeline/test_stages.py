"""Bounded pipeline stages: admission rejects when full, inner stages make requests wait."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.errors import ResourceExhausted
from pipeline.stages import Pipeline, Spans, Stage

TIMEOUT_S = 10


def test_fail_fast_stage_rejects_when_full():
    async def scenario() -> None:
        stage = Stage("admission", capacity=2, fail_fast=True)
        async with stage.enter(), stage.enter():
            assert stage.inside == 2
            with pytest.raises(ResourceExhausted, match="admission is full"):
                async with stage.enter():
                    pass
        async with stage.enter():
            assert stage.inside == 1
        assert stage.inside == 0

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))


def test_backpressure_stage_admits_waiters_in_order():
    async def scenario() -> None:
        stage = Stage("language", capacity=1)
        order: list[str] = []
        release_first = asyncio.Event()

        async def first() -> None:
            async with stage.enter():
                order.append("first in")
                await release_first.wait()
            order.append("first out")

        async def second() -> None:
            async with stage.enter() as waited:
                order.append("second in")
                assert waited > 0

        task_first = asyncio.create_task(first())
        while stage.inside == 0:
            await asyncio.sleep(0)
        task_second = asyncio.create_task(second())
        while stage.waiting == 0:
            await asyncio.sleep(0)
        assert order == ["first in"] and stage.waiting == 1
        release_first.set()
        await asyncio.gather(task_first, task_second)
        assert order == ["first in", "first out", "second in"]
        assert stage.inside == 0 and stage.waiting == 0

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))


def test_a_cancelled_waiter_leaves_no_trace():
    async def scenario() -> None:
        stage = Stage("vision", capacity=1)
        async with stage.enter():
            waiter = asyncio.create_task(stage.enter().__aenter__())
            while stage.waiting == 0:
                await asyncio.sleep(0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert stage.waiting == 0
        async with stage.enter():
            assert stage.inside == 1

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))


def test_pipeline_and_spans():
    async def scenario() -> Pipeline:
        return Pipeline.create(max_pending=3, max_vision=2, max_language=1)

    pipeline = asyncio.run(scenario())
    assert (pipeline.admission.fail_fast, pipeline.vision.fail_fast) == (True, False)
    assert pipeline.language.capacity == 1
    Spans(vision_queue=0.1, decode=0.2).observe()
