"""The servicer's deadline and the closing of its nested generators (a stand-in engine and media
preparer; the servers themselves are tested end to end in tests/e2e)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from language_server.api import GenerationService
from language_server.engine.sequence import EngineOutput, EngineRequest
from language_server.media_trace import MediaTrace
from pipeline.config import DvDConfig
from pipeline.errors import DeadlineExceeded
from pipeline.stages import Pipeline
from proto.dvd.v1 import generate_pb2 as pb

WAIT_S = 30.0
REQUEST = pb.GenerateRequest(
    messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])],
    sampling=pb.SamplingParameters(max_new_tokens=100),
)


class _Media:
    async def engine_request(self, req, params):
        return EngineRequest(req.request_id, [1, 2, 3], params), MediaTrace()


class _Engine:
    """Streams one token per output, finishing after `length` of them; records when it was closed."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.closed = False

    async def generate(self, request: EngineRequest):
        try:
            for i in range(self.length):
                await asyncio.sleep(0)
                done = i == self.length - 1
                yield EngineOutput(request.request_id, [i], "x", finish_reason="length" if done else None,
                                   prompt_tokens=3, completion_tokens=i + 1)
        finally:
            self.closed = True


def _service(engine: _Engine, timeout_s: float = 600.0) -> GenerationService:
    config = DvDConfig()
    config = replace(config, language=replace(config.language, request_timeout_s=timeout_s))
    return GenerationService(config, None, engine, _Media(), Pipeline.create(8, 8, 8), stop_token_ids=())


def test_a_deadline_that_passes_while_the_caller_holds_an_event_is_deadline_exceeded():
    """gRPC blocked writing an event is the caller not asking for the next one in time."""
    engine = _Engine(length=1000)
    service = _service(engine, timeout_s=0.2)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stream = service.Generate(REQUEST, None)
        started = loop.time()
        first = await anext(stream)
        assert first.HasField("delta")
        while loop.time() < started + 0.2:  # a write that outlasts the deadline
            await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await anext(stream)
        assert engine.closed

    asyncio.run(asyncio.wait_for(main(), WAIT_S))


def test_unary_closes_the_engine_stream_as_it_returns():
    engine = _Engine(length=3)
    service = _service(engine)

    async def main() -> None:
        result = await service.GenerateUnary(REQUEST, None)
        assert list(result.token_ids) == [0, 1, 2]
        assert engine.closed

    asyncio.run(asyncio.wait_for(main(), WAIT_S))
