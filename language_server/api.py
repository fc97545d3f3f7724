"""The public gRPC API (dvd.v1.Generation) of the language server."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import replace
from typing import AsyncIterator

from language_server import metrics
from language_server.engine.async_engine import AsyncEngine
from language_server.engine.sampling import SampleOutput
from language_server.engine.sequence import EngineOutput
from language_server.media_preparer import MediaPreparer
from language_server.media_trace import MediaTrace
from language_server.request import GenerationRequest
from language_server.request_reader import RequestReader
from pipeline.model.checkpoint import Checkpoint
from pipeline.config import DvDConfig
from pipeline.errors import DeadlineExceeded, DvDError, InternalError
from pipeline.stages import Pipeline
from proto.dvd.v1 import generate_pb2 as pb
from proto.dvd.v1 import generate_pb2_grpc

log = logging.getLogger(__name__)
_FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop_string": pb.FINISH_REASON_STOP_STRING}


class GenerationService(generate_pb2_grpc.GenerationServicer):
    """Validates requests, moves them through the pipeline stages, and streams the engine's output."""

    def __init__(
        self,
        config: DvDConfig,
        checkpoint: Checkpoint,
        engine: AsyncEngine,
        media: MediaPreparer,
        pipeline: Pipeline,
        stop_token_ids: tuple[int, ...],
    ) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.engine = engine
        self.media = media
        self.pipeline = pipeline
        self.stop_token_ids = stop_token_ids
        self.reader = RequestReader(config)

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        async with aclosing(self._generate(request)) as events:
            async for event in events:
                yield event

    async def GenerateUnary(self, request: pb.GenerateRequest, context) -> pb.GenerateResult:
        return await self.generate_result(request)

    @property
    def model_name(self) -> str:
        """The served model's name: model.name, else "tiny" or the checkpoint's directory name."""
        return self.config.model.name or ("tiny" if self.config.model.path == "tiny" else self.checkpoint.name)

    def generate_events(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The events of one request, as Generate streams them (the HTTP API's way in); DvDError ends it."""
        return self._generate(request)

    async def generate_result(self, request: pb.GenerateRequest) -> pb.GenerateResult:
        """The result of one request, as GenerateUnary answers it (the HTTP API's way in too)."""
        async with aclosing(self._generate(request)) as events:
            async for event in events:
                if event.HasField("result"):
                    return event.result
        raise InternalError("generation ended without a result")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        lc = self.config.language
        return pb.ModelInfo(
            model=self.model_name,
            checkpoint_format=self.checkpoint.format,
            llm_architecture=self.checkpoint.llm_architecture,
            max_model_len=lc.max_model_len,
            default_max_new_tokens=lc.default_max_new_tokens,
            max_new_tokens_limit=lc.max_new_tokens_limit,
            tokens_per_tile=self.checkpoint.tokens_per_tile,
            max_tiles_per_image=self.config.images.max_tiles,
            vision_servers=list(self.config.vision_endpoints) if self.config.mode == "decoupled" else [],
            mode=self.config.mode,
        )

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The request's events. The deadline bounds the work between events, not the time the
        caller takes to pass an event on: a deadline that passes while gRPC is writing is reported
        as DEADLINE_EXCEEDED when the next event is due."""
        arrived = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.config.language.request_timeout_s
        outcome = "error"
        try:
            req = await self.reader.read(request)
            async with self.pipeline.admission.enter():
                metrics.IN_FLIGHT.inc()
                try:
                    async with aclosing(self._run(req, arrived)) as events:
                        while True:
                            async with asyncio.timeout_at(deadline):
                                event = await anext(events, None)
                            if event is None:
                                break
                            if event.HasField("result"):
                                outcome = "ok"
                            yield event
                finally:
                    metrics.IN_FLIGHT.dec()
        except TimeoutError:
            outcome = "timeout"
            raise DeadlineExceeded(f"request exceeded {self.config.language.request_timeout_s:g} s") from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except DvDError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            metrics.REQUESTS.labels(outcome).inc()

    async def _run(self, req: GenerationRequest, arrived: float) -> AsyncIterator[pb.GenerateResponse]:
        params = replace(req.sampling, stop_token_ids=self.stop_token_ids)
        engine_request, trace = await self.media.engine_request(req, params)
        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[pb.PositionLogprobs] = []
        first_token: float | None = None
        try:
            async with self.pipeline.language.enter(), aclosing(self.engine.generate(engine_request)) as outputs:
                async for out in outputs:
                    _raise_engine_error(out, req.request_id)
                    if first_token is None and out.token_ids:
                        first_token = time.perf_counter()
                    delta = pb.TokenDelta(text=out.text, token_ids=out.token_ids, logprobs=_logprobs(out.logprobs))
                    text.append(out.text)
                    token_ids += out.token_ids
                    logprobs += delta.logprobs
                    if out.token_ids or out.text:
                        yield pb.GenerateResponse(delta=delta)
                    if out.finished:
                        done = time.perf_counter()
                        yield pb.GenerateResponse(
                            result=self._result(req, out, trace, "".join(text), token_ids, logprobs,
                                                arrived, first_token or done, done)
                        )
        finally:
            trace.cancel()  # features still arriving for a request that ended

    def _result(
        self,
        req: GenerationRequest,
        out: EngineOutput,
        trace: MediaTrace,
        text: str,
        token_ids: list[int],
        logprobs: list[pb.PositionLogprobs],
        arrived: float,
        first: float,
        done: float,
    ) -> pb.GenerateResult:
        spans = trace.spans
        spans.llm_queue = max(0.0, out.queued_s - trace.prepare_s)
        spans.prefill = out.prefill_s
        spans.decode = out.decode_s
        spans.observe()
        metrics.TTFT_S.observe(first - arrived)
        metrics.E2E_S.observe(done - arrived)
        if out.completion_tokens > 1:
            metrics.TPOT_S.observe((done - first) / (out.completion_tokens - 1))
        metrics.PROMPT_TOKENS.inc(out.prompt_tokens)
        metrics.COMPLETION_TOKENS.inc(out.completion_tokens)
        metrics.TRANSFER_BYTES.inc(trace.payload_bytes)
        timings = pb.Timings(
            vision_queue_ms=spans.vision_queue * 1000,
            vision_compute_ms=spans.vision_compute * 1000,
            transfer_ms=spans.transfer * 1000,
            llm_queue_ms=spans.llm_queue * 1000,
            prefill_ms=spans.prefill * 1000,
            decode_ms=spans.decode * 1000,
            time_to_first_token_ms=(first - arrived) * 1000,
            total_ms=(done - arrived) * 1000,
        )
        log.info(
            "request finished",
            extra={
                "request_id": req.request_id,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "image_tiles": trace.image_tiles,
                "finish": out.finish_reason,
                "ttft_ms": round(timings.time_to_first_token_ms, 2),
                "total_ms": round(timings.total_ms, 2),
            },
        )
        return pb.GenerateResult(
            request_id=req.request_id,
            text=text,
            token_ids=token_ids,
            finish_reason=_FINISH[out.finish_reason],
            usage=pb.Usage(
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                image_tokens=trace.image_tokens,
                image_tiles=trace.image_tiles,
            ),
            timings=timings,
            logprobs=logprobs,
        )


def _raise_engine_error(out: EngineOutput, request_id: str) -> None:
    if out.error is None:
        return
    if isinstance(out.error, DvDError):
        raise out.error
    log.error("engine failed a request", exc_info=out.error, extra={"request_id": request_id})
    raise InternalError(f"engine error: {type(out.error).__name__}: {out.error}")


def _logprobs(samples: list[SampleOutput]) -> list[pb.PositionLogprobs]:
    return [
        pb.PositionLogprobs(
            chosen=pb.TokenLogprob(token_id=s.token_id, logprob=s.logprob),
            top=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in s.top],
        )
        for s in samples
    ]
