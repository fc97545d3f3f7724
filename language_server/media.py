"""Turning a request's images and videos into an engine request, the decoupled way.

`RemoteMedia` sends one VisionJob per image or video to the vision servers, waits for the
features inside the pipeline's vision stage, builds the prompt from the reported per-tile
token counts and hands the engine ready rows. The colocated baseline provides the same
`engine_request` method but encodes inline on the engine thread (pipeline/colocated.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

import torch

from language_server.engine.sampling import SamplingParams
from language_server.engine.sequence import EngineRequest
from language_server.prompt import MediaLayout, Prompt, PromptBuilder
from language_server.request import GenerationRequest, ImagePart, VideoPart
from language_server.vision_client import VisionClient, new_job_id
from pipeline.config import DvDConfig
from pipeline.errors import InvalidRequest
from pipeline.stages import Pipeline, Spans
from pipeline.wire import FeatureHeader, Features, VisionJob


@dataclass
class MediaTrace:
    """What the vision side did for one request; filled in once the features exist."""

    spans: Spans = field(default_factory=Spans)
    image_tiles: int = 0
    image_tokens: int = 0
    payload_bytes: int = 0
    prepare_s: float = 0.0  # time the engine thread spent preparing (colocated only)

    def record(self, headers: list[FeatureHeader], prompt: Prompt) -> None:
        self.image_tiles = sum(len(h.tile_tokens) for h in headers)
        self.image_tokens = prompt.image_tokens
        self.payload_bytes = sum(h.payload_bytes for h in headers)


class MediaStage(Protocol):
    """Makes the engine request for a validated generation request."""

    async def engine_request(
        self, req: GenerationRequest, params: SamplingParams
    ) -> tuple[EngineRequest, MediaTrace]: ...


class LocalVision(Protocol):
    """A vision half inside the language server's process (the colocated baseline)."""

    loaded_tensors: list[str]
    modules: list[torch.nn.Module]

    def media_stage(self, prompts: PromptBuilder, pipeline: Pipeline) -> MediaStage: ...

    def close(self) -> None: ...


def vision_jobs(req: GenerationRequest, config: DvDConfig) -> list[VisionJob]:
    """One job per image or video of the request, in prompt order (reply_to is filled by the sender)."""
    images = config.images
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
    return jobs


def build_prompt(
    prompts: PromptBuilder, req: GenerationRequest, headers: list[FeatureHeader], max_model_len: int
) -> Prompt:
    prompt = prompts.build(req.messages, [MediaLayout(h.tile_tokens, h.frame_tiles) for h in headers])
    if len(prompt.token_ids) >= max_model_len:
        raise InvalidRequest(f"the prompt is {len(prompt.token_ids)} tokens; max_model_len is {max_model_len}")
    return prompt


class RemoteMedia:
    """Decoupled mode: vision servers encode, the transport delivers, then the engine runs."""

    def __init__(self, client: VisionClient, prompts: PromptBuilder, config: DvDConfig, pipeline: Pipeline) -> None:
        self.client = client
        self.prompts = prompts
        self.config = config
        self.pipeline = pipeline

    async def engine_request(
        self, req: GenerationRequest, params: SamplingParams
    ) -> tuple[EngineRequest, MediaTrace]:
        trace = MediaTrace()
        features = await self._encode(req, trace) if req.media else []
        headers = [f.header for f in features]
        prompt = build_prompt(self.prompts, req, headers, self.config.language.max_model_len)
        trace.record(headers, prompt)
        rows = torch.cat([f.tensor for f in features]) if features else None
        for f in features:
            f.release()
        return EngineRequest(req.request_id, prompt.token_ids, params, rows), trace

    async def _encode(self, req: GenerationRequest, trace: MediaTrace) -> list[Features]:
        async with self.pipeline.vision.enter() as waited:
            tasks = [asyncio.ensure_future(self.client.encode(job)) for job in vision_jobs(req, self.config)]
            try:
                features = list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
        spans = trace.spans
        spans.vision_queue = waited + max(f.header.timings.queue_ms for f in features) / 1000
        spans.vision_compute = max(f.header.timings.preprocess_ms + f.header.timings.compute_ms for f in features) / 1000
        spans.transfer = max(transfer_s(f) for f in features)
        return features


def transfer_s(features: Features) -> float:
    """Seconds from the vision server handing the payload to the transport to the receiver holding it."""
    return max(0.0, features.received_unix_s - features.header.timings.sent_unix_s)
