"""The single-stage loads that pipeline efficiency divides by: vision-only sends the bench's
images straight to DvD's vision server; LLM-only sends text prompts of the same token length to
DvD's language server."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import server_cpu
from benchmarks.load import LoadResult, RequestRecord
from benchmarks.report import Progress
from benchmarks.workloads import PROMPT, Workload
from language_server.media_layout import new_job_id
from language_server.vision_client import VisionClient
from pipeline.client import DvDClient, message
from pipeline.errors import DvDError
from pipeline.entrypoints.launch import Deployment
from pipeline.wire import VisionJob
from proto.dvd.v1 import generate_pb2 as pb


def text_twin(deployment: Deployment, workload: Workload, model_path: Path) -> Workload:
    """Text-only requests with the same prompt length as the image requests (the LLM-only load)."""
    text = filler_text(model_path, prompt_tokens(deployment, workload))

    class TextWorkload(Workload):
        def request(self, index: int) -> pb.GenerateRequest:
            return pb.GenerateRequest(
                request_id=f"text-{index}",
                messages=[message("user", f"{text} {PROMPT}")],
                sampling=pb.SamplingParameters(max_new_tokens=self.output_tokens, temperature=0.0, ignore_eos=True),
            )

    return TextWorkload(workload.name + "-text", workload.side, (), workload.output_tokens)


def vision_only(deployment: Deployment, workload: Workload, total: int, concurrency: int, label: str) -> LoadResult:
    """Jobs straight to the vision server (no LLM), closed loop at the given concurrency; a
    request's first token and completion are both its features' arrival."""
    config = deployment.config
    receiver_port = config.language.feature_port + 10

    async def run() -> LoadResult:
        client = VisionClient(replace(config, language=replace(config.language, feature_port=receiver_port)), None)
        result = LoadResult(first_wave=concurrency)
        counter = iter(range(total))
        progress = Progress(total, label)
        done = 0

        async def worker() -> None:
            nonlocal done
            for index in counter:
                record = RequestRecord(sent=time.perf_counter())
                result.records.append(record)
                job = VisionJob(job_id=new_job_id(), request_id=f"v{index}", kind="image",
                                data=workload.image(index), reply_to="",
                                max_tiles=config.images.max_tiles)
                try:
                    async for part in client.encode_parts(job):
                        part.release()
                except DvDError as exc:  # counted like a failed request of the other setups
                    record.error = f"{type(exc).__name__}: {exc}"
                else:
                    record.first_token = record.done = time.perf_counter()
                done += 1
                progress(done)

        result.started = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            client.close()
        result.finished = time.perf_counter()
        return result

    return server_cpu.metered(deployment, lambda: asyncio.run(run()))


@functools.cache
def _tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def filler_text(model_path: Path, prompt_tokens: int) -> str:
    """Text that, with PROMPT and the chat template around it, makes a prompt of about `prompt_tokens` tokens."""
    tokenizer = _tokenizer(model_path)
    ids = tokenizer(" ".join(["tile"] * prompt_tokens))["input_ids"][: max(prompt_tokens - 20, 1)]
    return tokenizer.decode(ids)


def prompt_tokens(deployment: Deployment, workload: Workload) -> int:
    """The prompt length, in tokens, of the workload's image requests on this deployment."""
    with DvDClient(deployment.address) as client:
        request = workload.request(0)
        request.sampling.max_new_tokens = 1
        return client.generate(list(request.messages), request.sampling).usage.prompt_tokens
