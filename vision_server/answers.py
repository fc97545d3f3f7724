"""A job's answer: its FeatureHeader and feature rows, sent whole or in parts.

Every answer's header carries the job's whole layout (the tokens of each tile); a job whose
tiles span several encoder chunks may be answered in parts, each holding its rows from
FeatureHeader.row_offset on, the last part being the job's JobResult.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from pipeline.wire import FeatureHeader, VisionJob, VisionTimings, error_header
from vision_server.jobs import PreparedJob


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

    @classmethod
    def error(cls, job: VisionJob, status: int, message: str, server_id: str) -> JobResult:
        """An answer without features: a JobStatus code and a message for the requester."""
        return cls(job, error_header(job.job_id, job.request_id, status, message, server_id), None)


PartSink = Callable[[JobResult], None]


def feature_answer(
    prep: PreparedJob, tile_tokens: Sequence[int], rows: torch.Tensor, server_id: str, batch_start: float,
    compute_ms: float, cached: bool = False, row_offset: int = 0,
) -> JobResult:
    """An answer (or part of one) with feature rows, timed from the job's arrival to `batch_start`."""
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
        server_id=server_id,
        cached_tiles=len(tile_tokens) if cached else 0,
        row_offset=row_offset,
        shape=tuple(rows.shape),
    )
    return JobResult(prep.job, header, rows)


class PartStream:
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
