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
from language_server.prompt import MediaLayout, Prompt, PromptBuilder, PromptSkeleton
from language_server.request import GenerationRequest, ImagePart, TextPart, VideoPart
from language_server.vision_client import VisionClient, new_job_id
from pipeline.config import DvDConfig
from pipeline.errors import InternalError, InvalidRequest
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
    Video frames follow the images' thumbnail rule, as InternVL's `load_video` tiles each frame
    like an image (a frame cut into several tiles gets a thumbnail after them).
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
                          use_thumbnail=images.use_thumbnail, num_segments=part.num_segments, start_s=part.start_s,
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


def check_text_length(prompts: PromptBuilder, req: GenerationRequest, max_model_len: int) -> None:
    """Refuse, without tokenizing, text that cannot fit in max_model_len tokens however it tokenizes."""
    chars = sum(len(p.text) for m in req.messages for p in m.parts if isinstance(p, TextPart))
    limit = max_model_len * prompts.max_chars_per_token
    if chars > limit:
        raise InvalidRequest(
            f"the text is {chars} characters; max_model_len {max_model_len} tokens hold at most {limit}"
        )


def prepare_prompt(prompts: PromptBuilder, req: GenerationRequest, max_model_len: int) -> PromptSkeleton:
    """The request's text tokenized once, its images and videos left open (`fill_prompt` adds
    them). Before any vision work: InvalidRequest when the prompt leaves no room for one new token
    even with every image and frame empty. Tokenizing long text takes a while: call it off the
    event loop."""
    check_text_length(prompts, req, max_model_len)
    skeleton = prompts.skeleton(req.messages)
    tokens = skeleton.min_tokens
    if tokens >= max_model_len:
        before = " before its images and videos" if req.media else ""
        raise InvalidRequest(f"the prompt is {tokens} tokens{before}; max_model_len is {max_model_len}")
    return skeleton


def fill_prompt(skeleton: PromptSkeleton, layouts: list[MediaLayout], max_model_len: int) -> Prompt:
    """The prompt with the vision answer's rows; InvalidRequest when it does not leave room for one new token."""
    prompt = skeleton.fill(layouts)
    if len(prompt.token_ids) >= max_model_len:
        raise InvalidRequest(f"the prompt is {len(prompt.token_ids)} tokens; max_model_len is {max_model_len}")
    return prompt


def release_all(features: list[Features]) -> None:
    for f in features:
        f.release()


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
        max_len = self.config.language.max_model_len
        jobs = vision_jobs(req, self.config, self.group_images)
        skeleton = await asyncio.to_thread(prepare_prompt, self.prompts, req, max_len)
        features = await self._encode(jobs, trace) if jobs else []
        try:
            check_frame_tiles(jobs, [f.header for f in features])
            layouts, rows = per_media(req, jobs, [(f.header, f.tensor) for f in features])
            prompt = fill_prompt(skeleton, layouts, max_len)
            trace.record([f.header for f in features], prompt)
        finally:
            release_all(features)
        return EngineRequest(req.request_id, prompt.token_ids, params, rows), trace

    async def _encode(self, jobs: list[VisionJob], trace: MediaTrace) -> list[Features]:
        """Every job's features; when one fails, the others' are released and the first error raised."""
        async with self.pipeline.vision.enter() as waited:
            tasks = [asyncio.ensure_future(self.client.encode(job)) for job in jobs]
            try:
                results = await asyncio.gather(*tasks, return_exceptions=True)
            except BaseException:  # cancelled: release what arrived; the rest release late answers
                for task in tasks:
                    task.cancel()
                release_all([t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None])
                raise
        features = [r for r in results if isinstance(r, Features)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors or len(features) != len(jobs):
            release_all(features)
            raise errors[0] if errors else InternalError("a vision job ended without features")
        spans = trace.spans
        spans.vision_queue = waited + max(f.header.timings.queue_ms for f in features) / 1000
        spans.vision_compute = max(f.header.timings.preprocess_ms + f.header.timings.compute_ms for f in features) / 1000
        spans.transfer = max(transfer_s(f) for f in features)
        return features


def check_frame_tiles(jobs: list[VisionJob], headers: list[FeatureHeader]) -> None:
    """Each answer must describe what its job asked for: one frame_tiles entry per image of a
    multi-image job (a single image may leave it empty), one per sampled frame of a video."""
    for job, header in zip(jobs, headers):
        expected = job.num_segments if job.kind == "video" else len(job.image_items)
        entries = len(header.frame_tiles) if header.frame_tiles or job.kind == "video" else 1
        if entries != expected:
            what = "frames" if job.kind == "video" else "images"
            raise InternalError(
                f"vision job {job.job_id} ({job.kind}) was answered with tile counts for {entries} {what}, "
                f"not {expected}"
            )


def transfer_s(features: Features) -> float:
    """Seconds from the vision server handing the payload to the transport to the receiver holding it."""
    return max(0.0, features.received_unix_s - features.header.timings.sent_unix_s)
