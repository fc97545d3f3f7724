"""Cross-request batching: prepared jobs from any requester become encoder batches.

A batch holds whole jobs, first come first served, up to `max_batch_tiles` tiles (a job
larger than that forms a batch of its own; the encoder then runs it in chunks). Once a job
is ready, the batch it starts waits at most `max_wait_ms` for more tiles.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Sequence

from vision_server.jobs import PreparedJob


def pack_batches(jobs: Sequence[PreparedJob], max_batch_tiles: int) -> list[list[PreparedJob]]:
    """Split jobs, in order, into consecutive batches of at most max_batch_tiles tiles each
    (a single job larger than the limit is a batch by itself)."""
    queue = deque(jobs)
    batches = []
    while queue:
        batches.append(take_batch(queue, max_batch_tiles))
    return batches


def take_batch(queue: deque[PreparedJob], max_batch_tiles: int) -> list[PreparedJob]:
    """Remove and return the first job of a non-empty queue and the jobs after it that still fit
    within max_batch_tiles tiles."""
    batch = [queue.popleft()]
    tiles = batch[0].tiles
    while queue and tiles + queue[0].tiles <= max_batch_tiles:
        job = queue.popleft()
        batch.append(job)
        tiles += job.tiles
    return batch


class TileBatcher:
    """A thread-safe queue of prepared jobs that hands out encoder batches."""

    def __init__(self, max_batch_tiles: int, max_wait_ms: float) -> None:
        if max_batch_tiles < 1:
            raise ValueError(f"max_batch_tiles must be >= 1, got {max_batch_tiles}")
        self.max_batch_tiles = max_batch_tiles
        self.max_wait_s = max_wait_ms / 1000
        self._jobs: deque[PreparedJob] = deque()
        self._tiles = 0
        self._ready = threading.Condition()

    def put(self, job: PreparedJob) -> None:
        """Queue a job that needs the encoder (its ready time starts now)."""
        job.ready_monotonic = time.monotonic()
        with self._ready:
            self._jobs.append(job)
            self._tiles += job.tiles
            self._ready.notify()

    @property
    def queued_tiles(self) -> int:
        return self._tiles

    def __len__(self) -> int:
        return len(self._jobs)

    def next_batch(self, timeout_s: float) -> list[PreparedJob]:
        """The next batch, or [] when no job became ready within timeout_s.

        Waits until the oldest job has been ready for max_wait_ms or the queue holds
        max_batch_tiles tiles, whichever comes first.
        """
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while not self._jobs:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._ready.wait(remaining)
            flush_at = self._jobs[0].ready_monotonic + self.max_wait_s
            while self._tiles < self.max_batch_tiles:
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            batch = take_batch(self._jobs, self.max_batch_tiles)
            self._tiles -= sum(job.tiles for job in batch)
            return batch
