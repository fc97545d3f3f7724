"""Decoupled mode: a request's images and videos encoded by the vision servers.

`RemoteMedia` sends one VisionJob per image or video (or one for all images, with ViR) to the
vision servers, waits inside the pipeline's vision stage for the first part of every answer,
builds the prompt from the reported per-tile token counts and hands the engine the rows: ready,
or, when an answer comes in several parts, an ArrivingRows that the request's feeder task fills
as the parts arrive.
"""

from __future__ import annotations

import asyncio
from typing import AsyncGenerator

import torch

from language_server.engine.arriving_rows import ArrivingRows
from language_server.engine.sampling import SamplingParams
from language_server.engine.sequence import EngineRequest, image_positions
from language_server.media_layout import check_frame_tiles, media_placements, placed_rows, tiled_jobs
from language_server.media_trace import MediaTrace
from language_server.prompt import PromptBuilder, fill_prompt, prepare_prompt
from language_server.request import GenerationRequest
from language_server.vision_client import VisionClient
from pipeline.config import DvDConfig
from pipeline.errors import DvDError, InternalError
from pipeline.stages import Pipeline
from pipeline.wire import FeatureHeader, Features, VisionJob


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
        tiled = tiled_jobs(req, self.config, self.group_images)
        jobs = [job for job, _ in tiled]
        skeleton = await asyncio.to_thread(prepare_prompt, self.prompts, req, max_len)
        if not jobs:
            return EngineRequest(req.request_id, fill_prompt(skeleton, [], max_len).token_ids, params), trace
        streams, firsts = await self._first_parts(tiled, trace)
        try:
            headers = [f.header for f in firsts]
            check_frame_tiles(jobs, headers)
            layouts, placements = media_placements(req, jobs, headers)
            prompt = fill_prompt(skeleton, layouts, max_len)
            trace.record(headers, prompt)
            rows: torch.Tensor | ArrivingRows = placed_rows(layouts, placements, [f.tensor for f in firsts])
            if not all(h.is_last for h in headers):
                positions = image_positions(prompt.token_ids, self.prompts.img_context)
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
        self, tiled: list[tuple[VisionJob, int]], trace: MediaTrace
    ) -> tuple[list[AsyncGenerator[Features, None]], list[Features]]:
        """Every job's answer stream and its first part; when one fails, the others are released
        and closed and the first error raised."""
        streams = [self.client.encode_parts(job, tiles) for job, tiles in tiled]
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
        if errors or len(firsts) != len(tiled):
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
