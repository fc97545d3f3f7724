"""The colocated baseline: both halves in one process, vision inline in the engine loop.

Built from the same parts as DvD (VisionWorker, PromptBuilder, Engine, GenerationService) and
serving the same gRPC API. Each request's images are encoded on the engine thread right
before its first prefill, so a large image stalls every running decode - the way one-process
servers behave, and what DvD is measured against.

    python -m pipeline.entrypoints.colocated --config configs/tiny.yaml --set mode=colocated
"""

from __future__ import annotations

import asyncio
import sys
import time

from language_server.engine.sampling import SamplingParams
from language_server.engine.sequence import EngineRequest, Prepared
from language_server.media_layout import check_frame_tiles, per_media, vision_jobs
from language_server.media_preparer import MediaPreparer
from language_server.media_trace import MediaTrace
from language_server.prompt import PromptBuilder, fill_prompt, prepare_prompt
from language_server.request import GenerationRequest
from pipeline.config import DvDConfig
from pipeline.stages import Pipeline
from vision_server.worker import VisionWorker


class InlineMedia:
    """Defers a request's vision work to the engine thread (EngineRequest.prepare)."""

    def __init__(self, worker: VisionWorker, prompts: PromptBuilder, config: DvDConfig) -> None:
        self.worker = worker
        self.prompts = prompts
        self.config = config

    async def engine_request(
        self, req: GenerationRequest, params: SamplingParams
    ) -> tuple[EngineRequest, MediaTrace]:
        trace = MediaTrace()
        max_len = self.config.language.max_model_len
        skeleton = await asyncio.to_thread(prepare_prompt, self.prompts, req, max_len)
        if not req.media:
            prompt = fill_prompt(skeleton, [], max_len)
            trace.record([], prompt)
            return EngineRequest(req.request_id, prompt.token_ids, params), trace
        jobs = vision_jobs(req, self.config, group_images=self.worker.router is not None)
        submitted = time.perf_counter()

        def prepare() -> Prepared:
            started = time.perf_counter()
            answers = self.worker.encode(jobs)
            for header, _ in answers:
                header.raise_for_status()
            check_frame_tiles(jobs, [header for header, _ in answers])
            layouts, rows = per_media(req, jobs, answers)
            prompt = fill_prompt(skeleton, layouts, max_len)
            trace.record([header for header, _ in answers], prompt)
            finished = time.perf_counter()
            trace.spans.vision_queue = started - submitted
            trace.spans.vision_compute = finished - started
            trace.prepare_s = finished - submitted
            return prompt.token_ids, rows

        return EngineRequest(req.request_id, [], params, prepare=prepare), trace


class ColocatedVision:
    """The vision half living in the language server's process."""

    def __init__(self, config: DvDConfig) -> None:
        self.config = config
        self.worker = VisionWorker(config, server_id="colocated")
        self.loaded_tensors = self.worker.loaded_tensors
        self.modules = self.worker.modules

    def media_preparer(self, prompts: PromptBuilder, pipeline: Pipeline) -> MediaPreparer:
        return InlineMedia(self.worker, prompts, self.config)

    def close(self) -> None:
        self.worker.close()


def main(argv: list[str] | None = None) -> int:
    from language_server.server import run_until_signalled
    from pipeline.runtime.process import server_args

    _, config = server_args("python -m pipeline.entrypoints.colocated", "Run the colocated baseline.", argv)
    run_until_signalled(config, "colocated", lambda: ColocatedVision(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
