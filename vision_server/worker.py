"""The vision pipeline of one device, usable without sockets.

    VisionJob -> prepare (limits, decode, tile; or a cache hit) -> run_batch (ViT over the
    tiles of many jobs, ViR routing per job, projectors) -> (FeatureHeader, rows)

The vision server drives `prepare` and `run_batch` from its threads; an in-process user
(the colocated baseline) calls `encode(jobs)`, which does both synchronously.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
from torch import nn

from pipeline.model.checkpoint import CheckpointError, open_model
from pipeline.config import DvDConfig
from pipeline.wire import FeatureHeader, JobStatus, VisionJob
from vision_server import metrics
from vision_server.answers import JobResult, PartSink, PartStream, feature_answer
from vision_server.batch_encoder import BatchEncoder
from vision_server.batcher import pack_batches
from vision_server.feature_cache import CachedFeatures, FeatureCache, cache_key
from vision_server.jobs import JobError, PreparedJob, load_pixels
from vision_server.model import VisionEncoder
from vision_server.vir import TokenMode, VisualResolutionRouter

log = logging.getLogger(__name__)


class VisionWorker:
    """Encoder, ViR router and feature cache of one vision device, plus its preprocessing pool."""

    def __init__(self, config: DvDConfig, replica: int = 0, server_id: str | None = None) -> None:
        vc = config.vision
        self.config = config
        self.device = vc.device_of(replica)
        self.server_id = server_id or f"vision-inline-{replica}"
        self.checkpoint = open_model(config.model.path, config.model.format)
        dtype = getattr(torch, vc.dtype)
        self.encoder, names = VisionEncoder.from_checkpoint(self.checkpoint, self.device, dtype)
        self.router: VisualResolutionRouter | None = None
        if self.checkpoint.is_flash:
            self.router, vir_names = VisualResolutionRouter.from_checkpoint(self.checkpoint, self.device, dtype)
            names = names + vir_names
        elif vc.vir_mode == "all_64":
            raise CheckpointError(f"vision.vir_mode all_64 needs a -Flash checkpoint; {self.checkpoint.path} is not one")
        self.loaded_tensors = sorted(names)
        self.tile_size = self.checkpoint.image_size
        self.batches = BatchEncoder(self.encoder, self.router, vc.max_batch_tiles, self.checkpoint.tokens_per_tile)
        self.cache = FeatureCache(vc.feature_cache_bytes)
        self.pool = ThreadPoolExecutor(vc.preprocess_workers, thread_name_prefix="preprocess")

    @property
    def modules(self) -> list[nn.Module]:
        return [self.encoder] + ([self.router] if self.router is not None else [])

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ----- the synchronous pipeline --------------------------------------------------------
    def encode(self, jobs: Sequence[VisionJob]) -> list[tuple[FeatureHeader, torch.Tensor | None]]:
        """Encode jobs in batches of at most max_batch_tiles tiles; one answer per job, in order.

        A job that fails is answered with an error header and no rows; the others are unaffected.
        """
        arrived = time.time()
        prepared = list(self.pool.map(lambda job: self.prepare(job, arrived), jobs))
        answers = [None if prep.needs_encoder else self.complete(prep) for prep in prepared]
        batches = pack_batches([prep for prep in prepared if prep.needs_encoder], self.batches.max_batch_tiles)
        results = _fill(answers, [result for batch in batches for result in self.run_batch(batch)])
        return [(result.header, result.rows) for result in results]

    # ----- the steps of a job: prepare, then complete or run_batch --------------------------
    def token_mode(self, job: VisionJob) -> TokenMode:
        """The routing mode that applies to a job: its own, or the configured one."""
        mode: TokenMode = self.config.vision.vir_mode if job.vir_mode == "config" else job.vir_mode
        if self.router is not None:
            return mode
        if job.vir_mode == "all_64":
            raise JobError(JobStatus.INVALID_INPUT, "vir_mode all_64 needs a -Flash checkpoint with the ViR router")
        return "all_256"

    def prepare(self, job: VisionJob, arrived: float | None = None) -> PreparedJob:
        """Check limits, look up the cache, decode and tile. Never raises: errors are recorded."""
        prepared = PreparedJob(job=job, arrived=arrived or time.time(), started=time.time())
        try:
            if job.expired:
                raise JobError(JobStatus.DEADLINE_EXCEEDED, "the job's deadline passed before it was preprocessed")
            prepared.token_mode = self.token_mode(job)
            if self.cache.enabled:
                prepared.cache_key = cache_key(job, prepared.token_mode)
                prepared.cached = self.cache.get(prepared.cache_key)
            if prepared.cached is None:
                prepared.pixels, prepared.frame_tiles = load_pixels(job, self.config, self.tile_size)
        except JobError as exc:
            prepared.error = exc
        except Exception:  # noqa: BLE001 - one bad input must not stop the server
            log.exception("preprocessing failed", extra={"job_id": job.job_id, "request_id": job.request_id})
            prepared.error = JobError(JobStatus.INTERNAL, "the vision server failed to preprocess this input")
        prepared.preprocessed = time.time()
        metrics.PREPROCESS_MS.observe((prepared.preprocessed - prepared.started) * 1000)
        return prepared

    def complete(self, prepared: PreparedJob) -> JobResult:
        """Answer a job that needs no encoder run: an error or a cache hit."""
        if prepared.error is not None:
            return self._failure(prepared, prepared.error)
        if prepared.cached is None:
            raise ValueError(f"job {prepared.job.job_id} needs the encoder")
        cached = prepared.cached
        return self._success(prepared, cached.tile_tokens, cached.rows, time.time(), 0.0, cached=True)

    def run_batch(self, batch: Sequence[PreparedJob], on_part: PartSink | None = None) -> list[JobResult]:
        """Answer every job of a batch, running the encoder once over all tiles that need it.

        With `on_part`, a job whose tiles span several encoder chunks has the rows of each
        finished chunk handed to `on_part` as a part of its answer (FeatureHeader.row_offset)
        while the rest encodes; its returned JobResult is then the last part. Jobs routed by
        ViR's router are answered in one part, since routing needs all of a job's tiles."""
        answers = [self._answer_before_encoding(prep) for prep in batch]
        ready = [prep for prep, answer in zip(batch, answers) if answer is None]
        return _fill(answers, self._run_isolated(ready, on_part) if ready else [])

    # ----- internals ------------------------------------------------------------------------
    def _answer_before_encoding(self, prep: PreparedJob) -> JobResult | None:
        """The answer of a job that will not reach the encoder (an error, a cache hit, a passed
        deadline); None for a job to encode."""
        if not prep.needs_encoder:
            return self.complete(prep)
        if prep.job.expired:
            return self._failure(prep, JobError(JobStatus.DEADLINE_EXCEEDED, "deadline passed in queue"))
        return None

    def _run_isolated(self, ready: list[PreparedJob], on_part: PartSink | None = None) -> list[JobResult]:
        """Run the batch; if it fails, run each job alone so that only the faulty one fails (and
        any job that had already sent parts, whose answer cannot start over)."""
        if len(ready) == 1:
            return [self._run_alone(ready[0], on_part)]
        streamed: set[str] = set()

        def sink(result: JobResult) -> None:
            streamed.add(result.job.job_id)
            on_part(result)

        try:
            return self._run(ready, sink if on_part is not None else None)
        except Exception:  # noqa: BLE001 - each job is run alone instead
            return [
                self._encoder_failure(prep) if prep.job.job_id in streamed else self._run_alone(prep, on_part)
                for prep in ready
            ]

    def _run_alone(self, prep: PreparedJob, on_part: PartSink | None) -> JobResult:
        try:
            return self._run([prep], on_part)[0]
        except Exception:  # noqa: BLE001 - one bad input must not stop the server
            log.exception("encoder failed", extra={"job_id": prep.job.job_id})
            return self._encoder_failure(prep)

    def _encoder_failure(self, prep: PreparedJob) -> JobResult:
        return self._failure(prep, JobError(JobStatus.INTERNAL, "the vision encoder failed on this input"))

    @torch.inference_mode()
    def _run(self, ready: list[PreparedJob], on_part: PartSink | None = None) -> list[JobResult]:
        batch_start = time.time()
        stream: PartStream | None = None
        if on_part is not None and not self.batches.routes(ready):  # token counts known: answer chunk by chunk

            def part(prep: PreparedJob, tokens: tuple[int, ...], rows: torch.Tensor, offset: int) -> JobResult:
                return self._answer(prep, tokens, rows, batch_start, (time.time() - batch_start) * 1000, row_offset=offset)

            stream = PartStream(ready, self.batches.planned_tile_tokens(ready), on_part, part)
        tile_rows = self.batches.tile_rows(ready, stream.send if stream is not None else None)
        elapsed_ms = (time.time() - batch_start) * 1000
        metrics.TILES.inc(len(tile_rows))
        metrics.BATCH_TILES.observe(len(tile_rows))
        metrics.BATCH_JOBS.observe(len(ready))
        metrics.ENCODE_MS.observe(elapsed_ms)
        results, start = [], 0
        for i, prep in enumerate(ready):
            rows = tile_rows[start : start + prep.tiles]
            tile_tokens = tuple(int(r.shape[0]) for r in rows)
            sent = stream.sent_tiles[i] if stream is not None else 0
            start += prep.tiles
            if prep.cache_key is not None:
                self.cache.put(prep.cache_key, CachedFeatures(tile_tokens, prep.frame_tiles, torch.cat(rows).cpu()))
            results.append(self._success(prep, tile_tokens, torch.cat(rows[sent:]).cpu(), batch_start, elapsed_ms,
                                         row_offset=sum(tile_tokens[:sent])))
        return results

    def _success(
        self, prep: PreparedJob, tile_tokens: tuple[int, ...], rows: torch.Tensor, batch_start: float, compute_ms: float,
        cached: bool = False, row_offset: int = 0,
    ) -> JobResult:
        """A job's (last) answer, counted in the metrics."""
        result = self._answer(prep, tile_tokens, rows, batch_start, compute_ms, cached, row_offset)
        metrics.QUEUE_MS.observe(result.header.timings.queue_ms)
        metrics.VIR_RATIO.observe(sum(tile_tokens) / (self.checkpoint.tokens_per_tile * len(tile_tokens)))
        for tokens in set(tile_tokens):
            metrics.VIR_TILES.labels(str(tokens)).inc(tile_tokens.count(tokens))
        metrics.JOBS.labels("ok").inc()
        return result

    def _answer(
        self, prep: PreparedJob, tile_tokens: Sequence[int], rows: torch.Tensor, batch_start: float, compute_ms: float,
        cached: bool = False, row_offset: int = 0,
    ) -> JobResult:
        return feature_answer(prep, tile_tokens, rows, self.server_id, batch_start, compute_ms, cached, row_offset)

    def _failure(self, prep: PreparedJob, error: JobError) -> JobResult:
        metrics.JOBS.labels(JobStatus.name(error.status)).inc()
        return JobResult.error(prep.job, error.status, error.message, self.server_id)


def _fill(answers: list[JobResult | None], later: Sequence[JobResult]) -> list[JobResult]:
    """`answers` with its gaps (None) filled from `later`, in order."""
    remaining = iter(later)
    return [answer if answer is not None else next(remaining) for answer in answers]
