"""Turning a request's images and videos into an engine request, the decoupled way.

`RemoteMedia` sends one VisionJob per image or video to the vision servers, waits inside the
pipeline's vision stage for the first part of every answer, builds the prompt from the
reported per-tile token counts and hands the engine the rows: ready, or, when an answer comes
in several parts, an ArrivingRows that the request's feeder task fills as the parts arrive.
The colocated baseline provides the same `engine_request` method but encodes inline on the
engine thread (pipeline/entrypoints/colocated.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncGenerator, Protocol

import torch

from language_server.engine.arriving_rows import ArrivingRows, Placement, place_rows
from language_server.engine.sampling import SamplingParams
from language_server.engine.sequence import EngineRequest
from language_server.prompt import MediaLayout, Prompt, PromptBuilder, PromptSkeleton
from language_server.request import GenerationRequest, ImagePart, TextPart, VideoPart
from language_server.vision_client import VisionClient, new_job_id
from pipeline.config import DvDConfig
from pipeline.errors import DvDError, InternalError, InvalidRequest
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

    feeder: asyncio.Task | None = None  # receives the parts of answers that come after the first

    def record(self, headers: list[FeatureHeader], prompt: Prompt) -> None:
        self.image_tiles = sum(len(h.tile_tokens) for h in headers)
        self.image_tokens = prompt.image_tokens
        self.payload_bytes = sum(h.payload_bytes for h in headers)

    def add_vision_times(self, features: Features) -> None:
        """Count a job's compute and transfer times from one of its answer's parts (the last, when
        there are several): the request's spans are the slowest job's."""
        timings = features.header.timings
        self.spans.vision_compute = max(self.spans.vision_compute, (timings.preprocess_ms + timings.compute_ms) / 1000)
        self.spans.transfer = max(self.spans.transfer, transfer_s(features))

    def cancel(self) -> None:
        """Stop receiving features (the request ended)."""
        if self.feeder is not None and not self.feeder.done():
            self.feeder.cancel()


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


def media_placements(
    req: GenerationRequest, jobs: list[VisionJob], headers: list[FeatureHeader]
) -> tuple[list[MediaLayout], list[list[Placement]]]:
    """Layouts in prompt order, and where each job's answer rows go among the prompt's feature
    rows (a multi-image job's images may lie apart, with videos between them)."""
    images: deque[tuple[MediaLayout, int, int]] = deque()  # (layout, job, first row of the job's answer)
    videos: deque[tuple[MediaLayout, int, int]] = deque()
    for index, (job, header) in enumerate(zip(jobs, headers)):
        if job.kind == "video":
            videos.append((MediaLayout(header.tile_tokens, header.frame_tiles), index, 0))
            continue
        tile = row = 0
        for count in header.frame_tiles or (len(header.tile_tokens),):
            tokens = header.tile_tokens[tile : tile + count]
            images.append((MediaLayout(tokens), index, row))
            tile, row = tile + count, row + sum(tokens)
    ordered = [images.popleft() if isinstance(p, ImagePart) else videos.popleft() for p in req.media]
    placements: list[list[Placement]] = [[] for _ in jobs]
    row = 0
    for layout, job, job_row in ordered:
        placements[job].append(Placement(job_row, row, layout.rows))
        row += layout.rows
    return [layout for layout, _, _ in ordered], placements


def per_media(
    req: GenerationRequest, jobs: list[VisionJob], answers: list[tuple[FeatureHeader, torch.Tensor]]
) -> tuple[list[MediaLayout], torch.Tensor | None]:
    """Layouts and feature rows in prompt order, splitting multi-image jobs back into images."""
    layouts, placements = media_placements(req, jobs, [header for header, _ in answers])
    if not layouts:
        return layouts, None
    return layouts, placed_rows(layouts, placements, [tensor for _, tensor in answers])


def placed_rows(layouts: list[MediaLayout], placements: list[list[Placement]], parts: list[torch.Tensor]) -> torch.Tensor:
    """The prompt's feature rows, with each job's first part (its whole answer, or the start of
    it) put in place; rows of parts still to come are left unset."""
    rows = torch.empty(sum(layout.rows for layout in layouts), parts[0].shape[1], dtype=parts[0].dtype)
    for job, part in enumerate(parts):
        place_rows(rows, placements[job], 0, part)
    return rows


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
        """The engine request once every job's first part of features is here. When some answer
        comes in several parts, the rest arrive into an ArrivingRows while the engine prefills
        (`trace.feeder` receives them)."""
        trace = MediaTrace()
        max_len = self.config.language.max_model_len
        jobs = vision_jobs(req, self.config, self.group_images)
        skeleton = await asyncio.to_thread(prepare_prompt, self.prompts, req, max_len)
        if not jobs:
            return EngineRequest(req.request_id, fill_prompt(skeleton, [], max_len).token_ids, params), trace
        streams, firsts = await self._first_parts(jobs, trace)
        try:
            headers = [f.header for f in firsts]
            check_frame_tiles(jobs, headers)
            layouts, placements = media_placements(req, jobs, headers)
            prompt = fill_prompt(skeleton, layouts, max_len)
            trace.record(headers, prompt)
            rows: torch.Tensor | ArrivingRows = placed_rows(layouts, placements, [f.tensor for f in firsts])
            if not all(h.is_last for h in headers):
                positions = [i for i, t in enumerate(prompt.token_ids) if t == self.prompts.img_context]
                rows = ArrivingRows(rows, placements, positions, received=[f.tensor.shape[0] for f in firsts])
        except BaseException:
            await close_streams(streams)
            raise
        finally:
            release_all(firsts)
        if isinstance(rows, ArrivingRows):
            trace.feeder = asyncio.ensure_future(self._feed(streams, headers, rows, trace))
            # however the feeder ends (cancelled even before it started), the streams are closed
            trace.feeder.add_done_callback(lambda _: asyncio.ensure_future(close_streams(streams)))
        else:
            await close_streams(streams)
        return EngineRequest(req.request_id, prompt.token_ids, params, rows), trace

    async def _first_parts(
        self, jobs: list[VisionJob], trace: MediaTrace
    ) -> tuple[list[AsyncGenerator[Features, None]], list[Features]]:
        """Every job's answer stream and its first part; when one fails, the others are released
        and closed and the first error raised."""
        streams = [self.client.encode_parts(job) for job in jobs]
        async with self.pipeline.vision.enter() as waited:
            tasks = [asyncio.ensure_future(anext(stream)) for stream in streams]
            try:
                results = await asyncio.gather(*tasks, return_exceptions=True)
            except BaseException:  # cancelled: release what arrived, close the streams
                for task in tasks:
                    task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                release_all([r for r in results if isinstance(r, Features)])
                await close_streams(streams)
                raise
        firsts = [r for r in results if isinstance(r, Features)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors or len(firsts) != len(jobs):
            release_all(firsts)
            await close_streams(streams)
            raise errors[0] if errors else InternalError("a vision job ended without features")
        spans = trace.spans
        spans.vision_queue = waited + max(f.header.timings.queue_ms for f in firsts) / 1000
        for first in firsts:
            trace.add_vision_times(first)
        return streams, firsts

    async def _feed(
        self, streams: list[AsyncGenerator[Features, None]], headers: list[FeatureHeader], rows: ArrivingRows,
        trace: MediaTrace,
    ) -> None:
        """Receive the remaining parts of every answer into `rows`; a failure ends the wait with its error."""
        try:
            for job, (stream, first) in enumerate(zip(streams, headers)):
                if first.is_last:
                    continue
                async for part in stream:
                    try:
                        trace.payload_bytes += part.header.payload_bytes
                        if part.header.is_last:
                            trace.add_vision_times(part)
                        rows.put(job, part.header.row_offset, part.tensor)
                    finally:
                        part.release()
        except asyncio.CancelledError:
            raise
        except DvDError as exc:
            rows.fail(exc)
        except Exception as exc:  # noqa: BLE001 - the request fails, the server goes on
            rows.fail(InternalError(f"receiving features failed: {type(exc).__name__}: {exc}"))


async def close_streams(streams: list[AsyncGenerator[Features, None]]) -> None:
    """Close answer streams (each releases whatever of its job still arrives)."""
    for stream in streams:
        try:
            await stream.aclose()
        except RuntimeError:  # still running in a task being cancelled; it closes itself
            pass


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
