"""The vision pipeline of one device, usable without sockets.

    VisionJob -> prepare (limits, decode, tile; or a cache hit) -> run_batch (ViT over the
    tiles of many jobs, ViR routing per job, projectors) -> (FeatureHeader, rows)

The vision server drives `prepare` and `run_batch` from its threads; an in-process user
(the colocated baseline) calls `encode(jobs)`, which does both synchronously.
"""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import nn

from pipeline.model.checkpoint import CheckpointError, open_model
from pipeline.config import DvDConfig
from pipeline.wire import FeatureHeader, JobStatus, VisionJob, VisionTimings, error_header
from vision_server import metrics
from vision_server.batcher import pack_batches
from vision_server.feature_cache import CachedFeatures, FeatureCache, cache_key
from vision_server.jobs import JobError, PreparedJob, load_pixels
from vision_server.model import VisionEncoder, pixel_shuffle
from vision_server.vir import TokenMode, VisualResolutionRouter, compressed_tiles

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """A job's answer: the header, and the feature rows [sum(tile_tokens), hidden] when OK.

    `job` is the job without its media bytes (an answer waiting to be sent holds no images)."""

    job: VisionJob
    header: FeatureHeader
    rows: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.job.data or self.job.images:
            self.job = replace(self.job, data=b"", images=())


PartSink = Callable[[JobResult], None]


class _Stream:
    """Sends each job's finished tiles as parts of its answer while later chunks still encode.
    A job's last part is its JobResult, returned with the batch."""

    def __init__(
        self, ready: list[PreparedJob], tile_tokens: list[int], sink: PartSink,
        answer: Callable[[PreparedJob, tuple[int, ...], torch.Tensor, int], JobResult],
    ) -> None:
        """`answer(prep, job_tile_tokens, rows, row_offset)` makes a part."""
        self.ready = ready
        self.sink = sink
        self.answer = answer
        self.starts = list(itertools.accumulate((p.tiles for p in ready), initial=0))
        self.job_tokens = [tuple(tile_tokens[a:b]) for a, b in itertools.pairwise(self.starts)]
        self.sent_tiles = [0] * len(ready)

    def send(self, tile_rows: list[torch.Tensor]) -> None:
        """Send, for every job still unfinished, its tiles that `tile_rows` holds and no part has carried."""
        for i, prep in enumerate(self.ready):
            start, done = self.starts[i], min(len(tile_rows), self.starts[i + 1]) - self.starts[i]
            if self.sent_tiles[i] < done < prep.tiles:
                rows = torch.cat(tile_rows[start + self.sent_tiles[i] : start + done]).cpu()
                offset = sum(self.job_tokens[i][: self.sent_tiles[i]])
                self.sink(self.answer(prep, self.job_tokens[i], rows, offset))
                self.sent_tiles[i] = done


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
        self.max_batch_tiles = vc.max_batch_tiles
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
        answers: dict[int, JobResult] = {}
        for prep in prepared:
            if not prep.needs_encoder:
                answers[id(prep)] = self.complete(prep)
        for batch in pack_batches([p for p in prepared if p.needs_encoder], self.max_batch_tiles):
            for prep, result in zip(batch, self.run_batch(batch)):
                answers[id(prep)] = result
        return [(answers[id(p)].header, answers[id(p)].rows) for p in prepared]

    # ----- stages -------------------------------------------------------------------------
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
        answers: dict[int, JobResult] = {}
        ready = []
        for prep in batch:
            if not prep.needs_encoder:
                answers[id(prep)] = self.complete(prep)
            elif prep.job.expired:
                answers[id(prep)] = self._failure(prep, JobError(JobStatus.DEADLINE_EXCEEDED, "deadline passed in queue"))
            else:
                ready.append(prep)
        if ready:
            for prep, result in zip(ready, self._run_isolated(ready, on_part)):
                answers[id(prep)] = result
        return [answers[id(p)] for p in batch]

    # ----- internals ------------------------------------------------------------------------
    def _run_isolated(self, ready: list[PreparedJob], on_part: PartSink | None = None) -> list[JobResult]:
        """Run the batch; if it fails, run each job alone so that only the faulty one fails (and
        any job that had already sent parts, whose answer cannot start over)."""
        streamed: set[str] = set()

        def sink(result: JobResult) -> None:
            streamed.add(result.job.job_id)
            on_part(result)

        try:
            return self._run(ready, sink if on_part is not None else None)
        except Exception:  # noqa: BLE001
            if len(ready) > 1:
                return [result for prep in ready for result in (
                    [self._encoder_failure(prep)] if prep.job.job_id in streamed else self._run_isolated([prep], on_part)
                )]
            log.exception("encoder failed", extra={"job_id": ready[0].job.job_id})
            return [self._encoder_failure(ready[0])]

    def _encoder_failure(self, prep: PreparedJob) -> JobResult:
        return self._failure(prep, JobError(JobStatus.INTERNAL, "the vision encoder failed on this input"))

    @torch.inference_mode()
    def _run(self, ready: list[PreparedJob], on_part: PartSink | None = None) -> list[JobResult]:
        batch_start = time.time()
        chunks = torch.cat([p.pixels for p in ready]).split(self.max_batch_tiles)
        stream: _Stream | None = None
        if self.router is not None and any(p.token_mode == "router" for p in ready):
            grid = torch.cat([self.encoder.vit_grid(chunk) for chunk in chunks])
            scores = self.router.scores(grid).split([p.tiles for p in ready])
            compress = self._compressed(ready, scores)
            tile_rows = self._project(grid, compress)
        else:  # each tile's token count is known before encoding: chunks can be answered as they finish
            compress = self._compressed(ready, None)
            if on_part is not None:
                stream = _Stream(ready, self._tile_tokens(compress), on_part, lambda prep, tokens, rows, offset: (
                    self._answer(prep, tokens, rows, batch_start, (time.time() - batch_start) * 1000, row_offset=offset)
                ))
            tile_rows: list[torch.Tensor] = []
            for chunk in chunks:
                tile_rows += self._project(self.encoder.vit_grid(chunk), compress[len(tile_rows):][: len(chunk)])
                if stream is not None and len(tile_rows) < len(compress):
                    stream.send(tile_rows)
        elapsed_ms = (time.time() - batch_start) * 1000
        metrics.TILES.inc(len(compress))
        metrics.BATCH_TILES.observe(len(compress))
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

    def _compressed(self, ready: list[PreparedJob], scores: Sequence[torch.Tensor] | None) -> list[bool]:
        """For every tile of the batch, in order: is it compressed to a quarter of its tokens."""
        thresholds = self.router.thresholds if self.router is not None else None
        compress: list[bool] = []
        for i, prep in enumerate(ready):
            compress += compressed_tiles(prep.token_mode, scores[i] if scores else None, thresholds, prep.tiles)
        return compress

    def _tile_tokens(self, compress: list[bool]) -> list[int]:
        full = self.checkpoint.tokens_per_tile
        return [full // 4 if compressed else full for compressed in compress]

    def _project(self, grid: torch.Tensor, compress: list[bool]) -> list[torch.Tensor]:
        """Per-tile feature rows of a ViT grid, each tile through the projector its flag picks."""
        mask = torch.tensor(compress, dtype=torch.bool, device=grid.device)
        full = self.encoder.project_full(grid[~mask]) if not mask.all() else None
        small = None
        if mask.any():
            small = self.router.project_compressed(pixel_shuffle(grid[mask], self.encoder.downsample_ratio**2))
        return self._assemble(compress, full, small)

    @staticmethod
    def _assemble(compress: list[bool], full: torch.Tensor | None, small: torch.Tensor | None) -> list[torch.Tensor]:
        """Per-tile feature rows in tile order, taken from the full and compressed projections."""
        out, next_full, next_small = [], 0, 0
        for compressed in compress:
            if compressed:
                out.append(small[next_small])
                next_small += 1
            else:
                out.append(full[next_full])
                next_full += 1
        return out

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
        queue_s = (prep.started - prep.arrived) + max(0.0, batch_start - prep.preprocessed)
        header = FeatureHeader(
            job_id=prep.job.job_id,
            request_id=prep.job.request_id,
            tile_tokens=tuple(tile_tokens),
            frame_tiles=prep.cached.frame_tiles if cached else prep.frame_tiles,
            timings=VisionTimings(
                queue_ms=queue_s * 1000,
                preprocess_ms=(prep.preprocessed - prep.started) * 1000,
                compute_ms=compute_ms,
            ),
            server_id=self.server_id,
            cached_tiles=len(tile_tokens) if cached else 0,
            row_offset=row_offset,
            shape=tuple(rows.shape),
        )
        return JobResult(prep.job, header, rows)

    def _failure(self, prep: PreparedJob, error: JobError) -> JobResult:
        metrics.JOBS.labels(JobStatus.name(error.status)).inc()
        header = error_header(prep.job.job_id, prep.job.request_id, error.status, error.message, self.server_id)
        return JobResult(prep.job, header, None)
