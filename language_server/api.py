"""The public gRPC API (dvd.v1.Generation) of the language server."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import AsyncIterator

import torch

from language_server import metrics
from language_server.engine.async_engine import AsyncEngine
from language_server.engine.sampling import SampleOutput
from language_server.engine.sequence import EngineOutput, EngineRequest
from language_server.prompt import MediaLayout, PromptBuilder
from language_server.request import GenerationRequest, ImagePart, VideoPart
from language_server.vision_client import VisionClient, new_job_id
from pipeline.checkpoint import Checkpoint
from pipeline.config import DvDConfig
from pipeline.errors import DeadlineExceeded, DvDError, InternalError, InvalidRequest, ResourceExhausted
from pipeline.wire import Features, VisionJob
from proto.dvd.v1 import generate_pb2 as pb
from proto.dvd.v1 import generate_pb2_grpc

log = logging.getLogger(__name__)
_FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop_string": pb.FINISH_REASON_STOP_STRING}


class GenerationService(generate_pb2_grpc.GenerationServicer):
    """Validates requests, gathers image features, and streams the engine's output."""

    def __init__(
        self,
        config: DvDConfig,
        checkpoint: Checkpoint,
        engine: AsyncEngine,
        vision: VisionClient,
        prompts: PromptBuilder,
        stop_token_ids: tuple[int, ...],
    ) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.engine = engine
        self.vision = vision
        self.prompts = prompts
        self.stop_token_ids = stop_token_ids
        self._in_flight = 0

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        async for event in self._generate(request):
            yield event

    async def GenerateUnary(self, request: pb.GenerateRequest, context) -> pb.GenerateResult:
        async for event in self._generate(request):
            if event.HasField("result"):
                return event.result
        raise InternalError("generation ended without a result")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        lc = self.config.language
        return pb.ModelInfo(
            model=self.config.model.name or ("tiny" if self.config.model.path == "tiny" else self.checkpoint.name),
            checkpoint_format=self.checkpoint.format,
            llm_architecture=self.checkpoint.llm_architecture,
            max_model_len=lc.max_model_len,
            default_max_new_tokens=lc.default_max_new_tokens,
            max_new_tokens_limit=lc.max_new_tokens_limit,
            tokens_per_tile=self.checkpoint.tokens_per_tile,
            max_tiles_per_image=self.config.images.max_tiles,
            vision_servers=list(self.config.vision_endpoints),
            mode=self.config.mode,
        )

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        arrived = time.perf_counter()
        try:
            req = GenerationRequest.from_pb(request, self.config)
        except InvalidRequest:
            metrics.REQUESTS.labels("invalid").inc()
            raise
        if self._in_flight >= self.config.language.max_pending_requests:
            metrics.REQUESTS.labels("rejected").inc()
            raise ResourceExhausted(f"{self._in_flight} requests in flight; retry later")
        self._in_flight += 1
        metrics.IN_FLIGHT.inc()
        outcome = "error"
        try:
            async with asyncio.timeout(self.config.language.request_timeout_s):
                async for event in self._run(req, arrived):
                    if event.HasField("result"):
                        outcome = "ok"
                    yield event
        except TimeoutError:
            outcome = "timeout"
            raise DeadlineExceeded(f"request exceeded {self.config.language.request_timeout_s:g} s") from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except InvalidRequest:
            outcome = "invalid"
            raise
        finally:
            self._in_flight -= 1
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(outcome).inc()

    async def _run(self, req: GenerationRequest, arrived: float) -> AsyncIterator[pb.GenerateResponse]:
        features = await self._encode_media(req)
        vision_done = time.perf_counter()
        layouts = [MediaLayout(f.header.tile_tokens, f.header.frame_tiles) for f in features]
        prompt = self.prompts.build(req.messages, layouts)
        max_len = self.config.language.max_model_len
        if len(prompt.token_ids) >= max_len:
            raise InvalidRequest(f"the prompt is {len(prompt.token_ids)} tokens; max_model_len is {max_len}")
        image_rows = torch.cat([f.tensor for f in features]) if features else None
        for f in features:
            f.release()
        params = replace(req.sampling, stop_token_ids=self.stop_token_ids)
        engine_request = EngineRequest(req.request_id, prompt.token_ids, params, image_rows)

        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[pb.PositionLogprobs] = []
        first_token: float | None = None
        async for out in self.engine.generate(engine_request):
            if out.error is not None:
                if isinstance(out.error, DvDError):
                    raise out.error
                log.error("engine failed a request", exc_info=out.error, extra={"request_id": req.request_id})
                raise InternalError(f"engine error: {type(out.error).__name__}: {out.error}")
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
                timings = _timings(features, out, arrived, vision_done, first_token or done, done)
                self._observe(out, features, arrived, first_token or done, done, vision_done)
                result = pb.GenerateResult(
                    request_id=req.request_id,
                    text="".join(text),
                    token_ids=token_ids,
                    finish_reason=_FINISH[out.finish_reason],
                    usage=pb.Usage(
                        prompt_tokens=out.prompt_tokens,
                        completion_tokens=out.completion_tokens,
                        image_tokens=prompt.image_tokens,
                        image_tiles=sum(len(f.header.tile_tokens) for f in features),
                    ),
                    timings=timings,
                    logprobs=logprobs,
                )
                log.info(
                    "request finished",
                    extra={
                        "request_id": req.request_id,
                        "prompt_tokens": out.prompt_tokens,
                        "completion_tokens": out.completion_tokens,
                        "finish": out.finish_reason,
                        "ttft_ms": round(timings.time_to_first_token_ms, 2),
                        "total_ms": round(timings.total_ms, 2),
                    },
                )
                yield pb.GenerateResponse(result=result)

    async def _encode_media(self, req: GenerationRequest) -> list[Features]:
        images = self.config.images
        jobs = []
        for part in req.media:
            common = dict(job_id=new_job_id(), request_id=req.request_id, data=part.data, reply_to="")
            if isinstance(part, ImagePart):
                jobs.append(
                    VisionJob(kind="image", min_tiles=images.min_tiles, max_tiles=part.max_tiles,
                              use_thumbnail=images.use_thumbnail, **common)
                )
            elif isinstance(part, VideoPart):
                jobs.append(
                    VisionJob(kind="video", min_tiles=1, max_tiles=part.max_tiles_per_frame, use_thumbnail=False,
                              num_segments=part.num_segments, start_s=part.start_s, end_s=part.end_s, **common)
                )
        if not jobs:
            return []
        tasks = [asyncio.ensure_future(self.vision.encode(job)) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    def _observe(
        self, out: EngineOutput, features: list[Features], arrived: float, first: float, done: float, vision_done: float
    ) -> None:
        for f in features:
            metrics.TRANSFER_MS.observe(_transfer_ms(f))
            metrics.TRANSFER_BYTES.inc(f.header.payload_bytes)
        metrics.TTFT_S.observe(first - arrived)
        metrics.E2E_S.observe(done - arrived)
        metrics.VISION_WAIT_S.observe(vision_done - arrived)
        if out.completion_tokens > 1:
            metrics.TPOT_S.observe((done - first) / (out.completion_tokens - 1))
        metrics.PROMPT_TOKENS.inc(out.prompt_tokens)
        metrics.COMPLETION_TOKENS.inc(out.completion_tokens)


def _logprobs(samples: list[SampleOutput]) -> list[pb.PositionLogprobs]:
    return [
        pb.PositionLogprobs(
            chosen=pb.TokenLogprob(token_id=s.token_id, logprob=s.logprob),
            top=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in s.top],
        )
        for s in samples
    ]


def _timings(
    features: list[Features], out: EngineOutput, arrived: float, vision_done: float, first: float, done: float
) -> pb.Timings:
    headers = [f.header for f in features]
    transfers = [_transfer_ms(f) for f in features]
    return pb.Timings(
        vision_queue_ms=max((h.timings.queue_ms for h in headers), default=0.0),
        vision_compute_ms=max((h.timings.preprocess_ms + h.timings.compute_ms for h in headers), default=0.0),
        transfer_ms=max(transfers, default=0.0),
        llm_queue_ms=out.queued_s * 1000,
        prefill_ms=out.prefill_s * 1000,
        decode_ms=out.decode_s * 1000,
        time_to_first_token_ms=(first - arrived) * 1000,
        total_ms=(done - arrived) * 1000,
    )


def _transfer_ms(features: Features) -> float:
    return max(0.0, features.received_unix_s - features.header.timings.sent_unix_s) * 1000
