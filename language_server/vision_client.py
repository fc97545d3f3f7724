"""The language server's side of the vision pipeline: send a job, stream its answer's parts.

`VisionReplicas` picks the vision server and moves a job on when one goes unanswered
(language_server/vision_replicas.py); `FeatureInbox`'s thread receives the features and routes
them to the job they answer (language_server/feature_inbox.py). An answer may come in parts, in
row order (FeatureHeader.row_offset): `encode_parts` yields them as they arrive.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import AsyncIterator

from language_server.feature_inbox import FeatureInbox, PendingJob
from language_server.tile_estimate import estimate_tiles
from language_server.vision_replicas import Assignment, VisionReplicas
from pipeline.config import DvDConfig
from pipeline.errors import DeadlineExceeded, InternalError
from pipeline.wire import Features, VisionJob


class VisionClient:
    """Sends VisionJobs to vision servers and streams each job's answer as it arrives."""

    def __init__(self, config: DvDConfig, hidden_size: int | None) -> None:
        """`hidden_size`: the width features must have (None: unknown, a vision-only client)."""
        self.timeout_s = config.language.vision_timeout_s
        self.inbox = FeatureInbox(config, hidden_size)
        self.replicas = VisionReplicas(config, self.inbox)

    def close(self) -> None:
        self.inbox.close()
        self.replicas.close()

    async def encode_parts(self, job: VisionJob, tiles: int | None = None) -> AsyncIterator[Features]:
        """Send one job and yield its answer's parts as they arrive, in row order (most answers
        have one part). Each part is the caller's to release. Errors map to request-ending
        DvDErrors; the first part may come from any replica that takes the job, the others
        must follow from the same one before the job's deadline. `tiles`: what the job will
        make, where the caller knows (else estimated from the job), for choosing a replica."""
        loop = asyncio.get_running_loop()
        now = time.time()
        job = replace(job, reply_to=self.inbox.address, sent_unix_s=now, deadline_unix_s=now + self.timeout_s)
        frame = job.encode()
        deadline = loop.time() + self.timeout_s
        assignment = Assignment(estimate_tiles(job) if tiles is None else tiles)
        pending = PendingJob(loop.create_future(), loop, on_answered=lambda: self.replicas.assign(assignment, None))
        claimed = False
        try:
            features = await self.replicas.first_answer(job.job_id, frame, pending, assignment, deadline)
            claimed = True
            features.header.raise_for_status()
            rows = 0
            while True:
                if features.header.row_offset != rows:
                    features.release()
                    raise InternalError(f"vision job {job.job_id}: a part starts at row {features.header.row_offset}, "
                                        f"not at row {rows}")
                rows += features.tensor.shape[0]
                last = features.header.is_last
                yield features
                if last:
                    return
                features = await self._next_part(pending, deadline)
        finally:
            self.inbox.forget(job.job_id, pending)
            self.replicas.assign(assignment, None)
            pending.close()
            if not claimed:  # features that arrive for an abandoned job go back to the transport
                pending.future.add_done_callback(_release_unclaimed)

    async def _next_part(self, pending: PendingJob, deadline: float) -> Features:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            result = await asyncio.wait_for(pending.parts.get(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the vision server did not send all of the features within {self.timeout_s:g} s") from None
        if isinstance(result, BaseException):
            raise result
        result.header.raise_for_status()
        return result


def _release_unclaimed(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()
