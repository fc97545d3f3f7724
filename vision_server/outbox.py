"""Delivery of answers to their reply addresses, one sending lane per requester.

Each lane owns a transport sender and a thread, so a language server that stops taking
features (gone, or slow) delays only its own answers, for at most the transport's send
timeout each, never those of other language servers. Lanes are created on first use,
up to `max_lanes`; further addresses share lanes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Callable

from pipeline.config import TransportConfig
from pipeline.transport import FeatureSender, TransportError, create_backend
from pipeline.wire import encode_features
from vision_server import metrics
from vision_server.worker import JobResult

log = logging.getLogger(__name__)
POLL_S = 0.1
MAX_LANES = 16

Done = Callable[[], None]


class _Lane:
    def __init__(self, name: str, sender: FeatureSender) -> None:
        self.sender = sender
        self.items: queue.Queue[tuple[JobResult, Done | None]] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not (self.stopping.is_set() and self.items.empty()):
            try:
                result, done = self.items.get(timeout=POLL_S)
            except queue.Empty:
                continue
            try:
                deliver(self.sender, result)
            except Exception:  # noqa: BLE001 - a malformed answer must not stop the lane
                log.exception("could not answer a job", extra={"job_id": result.job.job_id})
            finally:
                if done is not None:
                    done()
        self.sender.close()


class Outbox:
    """Sends JobResults to `job.reply_to`; `done` is called once each answer has left (or failed)."""

    def __init__(self, transport: TransportConfig, max_lanes: int = MAX_LANES) -> None:
        self._transport = transport
        self._max_lanes = max_lanes
        self._lanes: list[_Lane] = []
        self._lane_of: dict[str, _Lane] = {}
        self._lock = threading.Lock()

    def put(self, result: JobResult, done: Done | None = None) -> None:
        self._lane(result.job.reply_to).items.put((result, done))

    def _lane(self, address: str) -> _Lane:
        with self._lock:
            lane = self._lane_of.get(address)
            if lane is None:
                if len(self._lanes) < self._max_lanes:
                    lane = _Lane(f"vision-send-{len(self._lanes)}", create_backend(self._transport).sender())
                    self._lanes.append(lane)
                else:
                    lane = self._lanes[hash(address) % self._max_lanes]
                self._lane_of[address] = lane
            return lane

    def close(self, timeout_s: float) -> None:
        """Send what is queued (each lane within timeout_s), then stop the lanes."""
        with self._lock:
            lanes = list(self._lanes)
        for lane in lanes:
            lane.stopping.set()
        for lane in lanes:
            lane.thread.join(timeout_s)


def deliver(sender: FeatureSender, result: JobResult) -> None:
    """Serialize one answer and hand it to the transport, recording bytes and time."""
    header = result.header
    if header.ok:
        header = replace(header, timings=replace(header.timings, sent_unix_s=time.time()))
    frame, payload = encode_features(header, result.rows)
    started = time.perf_counter()
    try:
        sender.send(result.job.reply_to, frame, payload)
    except TransportError as exc:
        log.warning("could not deliver features: %s", exc, extra={"job_id": result.job.job_id})
        metrics.JOBS.labels("undelivered").inc()
        return
    metrics.SEND_MS.observe((time.perf_counter() - started) * 1000)
    metrics.BYTES_SENT.inc(len(payload))
