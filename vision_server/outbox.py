"""Delivery of answers to their reply addresses, one sending lane per requester.

Each lane owns a transport sender, a bounded queue and a thread, so a language server that
stops taking features (gone, or slow) delays only its own answers, never those of other
language servers. A lane does not send answers whose job's deadline has passed, skips an
address for one send timeout after it failed to take an answer in time, holds at most
`max_features` answers with feature rows (further ones are answered RESOURCE_EXHAUSTED
instead) and `max_queued` answers in all (further ones are dropped, logged).

An address gets a lane of its own only once it has taken an answer, up to `max_lanes` such
lanes (further verified addresses share them). Until then its answers go through a few shared
probation lanes, so requesters that never take an answer (gone, or never there: a job's reply
address is the requester's to choose) block only one another, never a language server that
works. All parts of one job's answer use the lane its first part took, so they stay in order.
Features that cannot be delivered (no shared memory left, a malformed tensor) are replaced by an
error header, so the request fails at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Callable

from pipeline.config import TransportConfig
from pipeline.transport import FeatureSender, PeerTimeout, TransportError, create_backend
from pipeline.wire import JobStatus, encode_features, error_header
from vision_server import metrics
from vision_server.answers import JobResult

log = logging.getLogger(__name__)
POLL_S = 0.1
MAX_LANES = 16
PROBATION_LANES = 4
MAX_QUEUED = 1024  # answers waiting in one lane
MAX_FEATURES = 64  # of those, answers that carry feature rows
MAX_DEAD = 64  # addresses a lane remembers as not taking answers

Done = Callable[[], None]


class _Lane:
    def __init__(
        self, name: str, sender: FeatureSender, max_queued: int, max_features: int, dead_s: float,
        delivered: Callable[[str], None],
    ) -> None:
        self.sender = sender
        self._delivered = delivered
        self.items: queue.Queue[tuple[JobResult, Done | None]] = queue.Queue(max_queued)
        self.stopping = threading.Event()
        self._features = 0  # queued answers that carry rows
        self._max_features = max_features
        self._features_lock = threading.Lock()
        self._dead_s = dead_s
        self._dead_until: dict[str, float] = {}
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def offer(self, result: JobResult, done: Done | None) -> None:
        """Queue an answer (raises queue.Full); one with rows beyond max_features becomes an error."""
        if result.rows is not None:
            with self._features_lock:
                full = self._features >= self._max_features
                if not full:
                    self._features += 1
            if full:
                log.warning("answered RESOURCE_EXHAUSTED: %d answers to %s are waiting to be sent",
                            self._max_features, result.job.reply_to, extra={"job_id": result.job.job_id})
                message = f"{self._max_features} answers to {result.job.reply_to} are waiting to be sent"
                result = JobResult.error(result.job, JobStatus.RESOURCE_EXHAUSTED, message, result.header.server_id)
        try:
            self.items.put_nowait((result, done))
        except queue.Full:
            self._sent(result)
            raise

    def skips(self, address: str) -> bool:
        return self._dead_until.get(address, 0.0) > time.monotonic()

    def _sent(self, result: JobResult) -> None:
        if result.rows is not None:
            with self._features_lock:
                self._features -= 1

    def _loop(self) -> None:
        while not (self.stopping.is_set() and self.items.empty()):
            try:
                result, done = self.items.get(timeout=POLL_S)
            except queue.Empty:
                continue
            try:
                self._answer(result)
            except Exception:  # noqa: BLE001 - a malformed answer must not stop the lane
                log.exception("could not answer a job", extra={"job_id": result.job.job_id})
            finally:
                self._sent(result)
                if done is not None:
                    done()
        self.sender.close()

    def _answer(self, result: JobResult) -> None:
        address = result.job.reply_to
        if result.job.expired:
            log.info("did not send the answer to an expired job", extra={"job_id": result.job.job_id})
            metrics.JOBS.labels("undelivered").inc()
            return
        now = time.monotonic()
        if self.skips(address):
            log.warning("dropped an answer: %s did not take the last one in time", address,
                        extra={"job_id": result.job.job_id})
            metrics.JOBS.labels("undelivered").inc()
            return
        self._dead_until.pop(address, None)
        if deliver(self.sender, result):
            self._delivered(address)
            return
        if len(self._dead_until) >= MAX_DEAD:
            self._dead_until = {a: t for a, t in self._dead_until.items() if t > now}
        self._dead_until[address] = time.monotonic() + self._dead_s


class Outbox:
    """Sends JobResults to `job.reply_to`; `done` is called once each answer has left, failed or
    been dropped. Creating it creates a sender, so a transport that cannot send fails here."""

    def __init__(
        self, transport: TransportConfig, max_lanes: int = MAX_LANES, max_queued: int = MAX_QUEUED,
        max_features: int = MAX_FEATURES, probation_lanes: int = PROBATION_LANES,
    ) -> None:
        self._transport = transport
        self._max_lanes = max_lanes
        self._probation_lanes = probation_lanes
        self._max_queued = max_queued
        self._max_features = max_features
        self._lanes: list[_Lane] = []  # for verified addresses
        self._probation: list[_Lane] = []  # shared by addresses that have not taken an answer yet
        self._lane_of: dict[str, _Lane] = {}
        self._verified: set[str] = set()
        self._lane_of_job: dict[str, _Lane] = {}  # jobs whose answer is being sent in parts
        self._lock = threading.Lock()
        self._spare: FeatureSender | None = self._new_sender()

    def _new_sender(self) -> FeatureSender:
        try:
            return create_backend(self._transport).sender()
        except Exception as exc:  # noqa: BLE001 - backends fail with their own error types
            raise TransportError(f"cannot create a {self._transport.backend!r} feature sender: {exc}") from exc

    def put(self, result: JobResult, done: Done | None = None) -> None:
        """Queue an answer on its address's lane. Never blocks or raises: an answer that cannot be
        queued (no sender could be made, the lane is full) is dropped with a log line."""
        try:
            self._lane_for(result).offer(result, done)
            return
        except queue.Full:
            log.warning("dropped an answer: the lane to %s already holds %d answers", result.job.reply_to,
                        self._max_queued, extra={"job_id": result.job.job_id})
        except Exception:  # noqa: BLE001 - e.g. a sender that cannot be created
            log.exception("could not queue an answer", extra={"job_id": result.job.job_id})
        metrics.JOBS.labels("undelivered").inc()
        if done is not None:
            done()

    def unreachable(self, address: str) -> bool:
        """True while `address` is skipped for not taking its last answer in time: a job that
        names it as its reply address is not worth encoding."""
        with self._lock:
            lane = self._lane_of.get(address)
            if lane is None and address not in self._verified and self._probation:
                lane = self._probation[hash(address) % len(self._probation)]
        return lane is not None and lane.skips(address)

    def _lane_for(self, result: JobResult) -> _Lane:
        """The lane of the job's earlier parts, or of its address."""
        job_id, last = result.job.job_id, result.header.is_last
        with self._lock:
            lane = self._lane_of_job.pop(job_id, None) if last else self._lane_of_job.get(job_id)
            if lane is None:
                lane = self._lane(result.job.reply_to)
                if not last:
                    self._lane_of_job[job_id] = lane
            return lane

    def _lane(self, address: str) -> _Lane:
        """Holds _lock."""
        lane = self._lane_of.get(address)
        if lane is not None:
            return lane
        if address not in self._verified:
            if not self._probation:  # all at once: an address keeps its probation lane (and what it knows of it)
                self._probation = [self._new_lane(f"vision-send-probation-{i}") for i in range(self._probation_lanes)]
            return self._probation[hash(address) % len(self._probation)]
        if len(self._lanes) >= self._max_lanes:
            return self._lanes[hash(address) % self._max_lanes]
        lane = self._new_lane(f"vision-send-{len(self._lanes)}")
        self._lanes.append(lane)
        self._lane_of[address] = lane
        return lane

    def _new_lane(self, name: str) -> _Lane:
        sender = self._spare or self._new_sender()
        self._spare = None
        return _Lane(name, sender, self._max_queued, self._max_features, self._transport.send_timeout_s,
                     self._verify)

    def _verify(self, address: str) -> None:
        """From a lane: `address` took an answer."""
        if address not in self._verified:
            with self._lock:
                self._verified.add(address)

    def close(self, timeout_s: float) -> None:
        """Send what is queued (within timeout_s in all), then stop the lanes. A lane still blocked
        in a send after that has its sender's shared memory freed from this thread."""
        with self._lock:
            lanes = self._lanes + self._probation
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()
        for lane in lanes:
            lane.stopping.set()
        deadline = time.monotonic() + timeout_s
        for lane in lanes:
            lane.thread.join(max(0.0, deadline - time.monotonic()))
        for lane in lanes:
            if lane.thread.is_alive():
                log.warning("a sending lane is still blocked at shutdown; freeing its shared memory")
                lane.sender.abandon()


def deliver(sender: FeatureSender, result: JobResult) -> bool:
    """Serialize one answer and hand it to the transport, recording bytes and time. Features that
    cannot be delivered are answered with an INTERNAL error header instead. False when the
    receiver did not take the message within the send timeout (it is gone or stalled)."""
    header = result.header
    if header.ok:
        header = replace(header, timings=replace(header.timings, sent_unix_s=time.time()))
    extra = {"job_id": result.job.job_id}
    started = time.perf_counter()
    try:
        frame, payload = encode_features(header, result.rows)
        sender.send(result.job.reply_to, frame, payload)
    except PeerTimeout as exc:
        log.warning("could not deliver an answer: %s", exc, extra=extra)
        metrics.JOBS.labels("undelivered").inc()
        return False
    except (TransportError, ValueError) as exc:  # WireError is a ValueError
        log.warning("could not deliver features: %s", exc, extra=extra)
        metrics.JOBS.labels("undelivered").inc()
        return _deliver_error(sender, result, f"the vision server could not deliver the features: {exc}")
    metrics.SEND_MS.observe((time.perf_counter() - started) * 1000)
    metrics.BYTES_SENT.inc(len(payload))
    return True


def _deliver_error(sender: FeatureSender, result: JobResult, message: str) -> bool:
    """Tell the requester that its job failed (header only, no payload); False on a send timeout."""
    if not result.header.ok:
        return True  # the error header itself could not be sent; there is nothing smaller to send
    job, header = result.job, result.header
    failed = error_header(job.job_id, job.request_id, JobStatus.INTERNAL, message, header.server_id)
    frame, _ = encode_features(failed, None)
    try:
        sender.send(job.reply_to, frame, b"")
    except PeerTimeout:
        return False
    except TransportError as exc:
        log.warning("could not send an error header either: %s", exc, extra={"job_id": job.job_id})
    return True
