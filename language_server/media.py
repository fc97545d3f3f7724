"""Turning a request's images and videos into an engine request, the decoupled way.

`RemoteMedia` sends one VisionJob per image or video to the vision servers, waits for the
features inside the pipeline's vision stage, builds the prompt from the reported per-tile
token counts and hands the engine ready rows. The colocated baseline provides the same
`engine_request` method but encodes inline on the engine thread (pipeline/colocated.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
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


def vision_jobs(req: GenerationRequest, config: DvDConfig, group_images: bool) -> list[VisionJob]:
    """The jobs for a request's images and videos (reply_to is filled by the sender).

    With `group_images` (ViR checkpoints) all images of the request travel as one job, so that
    the router's quantile is taken over every tile of the request; otherwise one job per image.
    """
    images = config.images
    image_parts = [p for p in req.media if isinstance(p, ImagePart)]
    grouped = group_images and len(image_parts) > 1
    common = dict(request_id=req.request_id, reply_to="", min_tiles=images.min_tiles)
    jobs = []
    if grouped:
        items = tuple((p.data, p.max_tiles) for p in image_parts)
        jobs.append(
            VisionJob(job_id=new_job_id(), kind="image", data=b"", images=items, use_thumbnail=images.use_thumbnail,
                      max_tiles=max(p.max_tiles for p in image_parts), **common)
        )
    for part in req.media:
        if isinstance(part, ImagePart) and not grouped:
            jobs.append(
                VisionJob(job_id=new_job_id(), kind="image", data=part.data, max_tiles=part.max_tiles,
                          use_thumbnail=images.use_thumbnail, **common)
            )
        elif isinstance(part, VideoPart):
            jobs.append(
                VisionJob(job_id=new_job_id(), kind="video", data=part.data, max_tiles=part.max_tiles_per_frame,
                          use_thumbnail=False, num_segments=part.num_segments, start_s=part.start_s,
                          end_s=part.end_s, **{**common, "min_tiles": 1})
            )
    return jobs


def per_media(
    req: GenerationRequest, jobs: list[VisionJob], answers: list[tuple[FeatureHeader, torch.Tensor]]
) -> tuple[list[MediaLayout], torch.Tensor | None]:
    """Layouts and feature rows in prompt order, splitting multi-image jobs back into images."""
    images: deque[tuple[MediaLayout, torch.Tensor]] = deque()
    videos: deque[tuple[MediaLayout, torch.Tensor]] = deque()
    for job, (header, rows) in zip(jobs, answers):
        if job.kind == "video":
            videos.append((MediaLayout(header.tile_tokens, header.frame_tiles), rows))
            continue
        tile = row = 0
        for count in header.frame_tiles or (len(header.tile_tokens),):
            tokens = header.tile_tokens[tile : tile + count]
            images.append((MediaLayout(tokens), rows[row : row + sum(tokens)]))
            tile, row = tile + count, row + sum(tokens)
    ordered = [images.popleft() if isinstance(p, ImagePart) else videos.popleft() for p in req.media]
    layouts = [layout for layout, _ in ordered]
    return layouts, torch.cat([rows for _, rows in ordered]) if ordered else None


def build_prompt(prompts: PromptBuilder, req: GenerationRequest, layouts: list[MediaLayout], max_model_len: int) -> Prompt:
    prompt = prompts.build(req.messages, layouts)
    if len(prompt.token_ids) >= max_model_len:
        raise InvalidRequest(f"the prompt is {len(prompt.token_ids)} tokens; max_model_len is {max_model_len}")
    return prompt


class RemoteMedia:
    """Decoupled mode: vision servers encode, the transport delivers, then the engine runs."""

    def __init__(
        self, client: VisionClient, prompts: PromptBuilder, config: DvDConfig, pipeline: Pipeline, group_images: bool
    ) -> None:
        self.client = client
        self.prompts = prompts
        self.config = config
        self.pipeline = pipeline
        self.group_images = group_images

    async def engine_request(
        self, req: GenerationRequest, params: SamplingParams
    ) -> tuple[EngineRequest, MediaTrace]:
        trace = MediaTrace()
        jobs = vision_jobs(req, self.config, self.group_images)
        features = await self._encode(jobs, trace) if jobs else []
        headers = [f.header for f in features]
        layouts, rows = per_media(req, jobs, [(f.header, f.tensor) for f in features])
        prompt = build_prompt(self.prompts, req, layouts, self.config.language.max_model_len)
        trace.record(headers, prompt)
        for f in features:
            f.release()
        return EngineRequest(req.request_id, prompt.token_ids, params, rows), trace

    async def _encode(self, jobs: list[VisionJob], trace: MediaTrace) -> list[Features]:
        async with self.pipeline.vision.enter() as waited:
            tasks = [asyncio.ensure_future(self.client.encode(job)) for job in jobs]
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
