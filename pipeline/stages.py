"""The three-stage request pipeline: bounded stages and per-request timing spans.

A request passes admission (fails fast with RESOURCE_EXHAUSTED when full), then the vision
stage (its images are encoded and transferred) and the language stage (the engine). Inner
stages apply backpressure: a request waits for room, and the waiting is bounded because
admission is. Different requests occupy different stages at the same time.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from prometheus_client import Gauge, Histogram

from pipeline.errors import ResourceExhausted

_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OCCUPANCY = Gauge("dvd_stage_occupancy", "Requests inside a pipeline stage", ["stage"])
WAITING = Gauge("dvd_stage_waiting", "Requests waiting to enter a pipeline stage", ["stage"])
STAGE_WAIT_S = Histogram("dvd_stage_wait_seconds", "Time a request waited to enter a stage", ["stage"], buckets=_S)
SPAN_S = Histogram("dvd_span_seconds", "Per-request time spent in each span of the pipeline", ["span"], buckets=_S)


class Stage:
    """At most `capacity` requests inside. `fail_fast` stages reject instead of making requests wait."""

    def __init__(self, name: str, capacity: int, fail_fast: bool = False) -> None:
        self.name = name
        self.capacity = capacity
        self.fail_fast = fail_fast
        self._free = asyncio.Semaphore(capacity)
        self.inside = 0
        self.waiting = 0

    @asynccontextmanager
    async def enter(self) -> AsyncIterator[float]:
        """Hold one place in the stage; yields the seconds spent waiting for it."""
        if self.fail_fast and self._free.locked():
            raise ResourceExhausted(f"{self.name} is full ({self.capacity} requests); retry later")
        started = time.perf_counter()
        self.waiting += 1
        WAITING.labels(self.name).inc()
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
            WAITING.labels(self.name).dec()
        waited = time.perf_counter() - started
        STAGE_WAIT_S.labels(self.name).observe(waited)
        self.inside += 1
        OCCUPANCY.labels(self.name).inc()
        try:
            yield waited
        finally:
            self.inside -= 1
            OCCUPANCY.labels(self.name).dec()
            self._free.release()


@dataclass
class Spans:
    """Where one request's time went (seconds)."""

    vision_queue: float = 0.0
    vision_compute: float = 0.0
    transfer: float = 0.0
    llm_queue: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0

    def observe(self) -> None:
        """Record every span in the Prometheus histogram."""
        for name, seconds in self.__dict__.items():
            SPAN_S.labels(name).observe(seconds)


@dataclass
class Pipeline:
    """The stages of one language server."""

    admission: Stage
    vision: Stage
    language: Stage

    @classmethod
    def create(cls, max_pending: int, max_vision: int, max_language: int) -> Pipeline:
        return cls(
            admission=Stage("admission", max_pending, fail_fast=True),
            vision=Stage("vision", max_vision),
            language=Stage("language", max_language),
        )
