"""The language server's side of the vision pipeline: send jobs, await validated features.

With several vision servers (replicas), each job goes to the reachable one with the fewest
outstanding tiles (estimated from the image header and the tiling grid). A replica is
treated as down when it does not take a job within the send timeout, or leaves a job
unanswered for `vision.replica_timeout_s` and then fails a health check (a busy replica
still answers it; a hung or dead one does not; replicas named in `language.vision_servers`
have no known health address and count as down on the timeout alone). The job is then
sent to another replica, and the replica is skipped for a while. Whichever answer to a job
arrives first is used. An answer may come in parts, in row order (FeatureHeader.row_offset):
`encode_parts` yields them as they arrive, `encode` joins them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from language_server.tile_estimate import image_tiles, video_tiles
from pipeline.model.tiling import most_tiles
from pipeline.wire.channels import PushChannel
from pipeline.config import DvDConfig
from pipeline.errors import DeadlineExceeded, InternalError, Unavailable
from pipeline.transport import FeatureReceiver, create_backend
from pipeline.transport.base import DEFAULT_MAX_FRAME_BYTES
from pipeline.wire import (
    Features,
    JobStatus,
    VisionJob,
    WireError,
    decode_features,
    decode_header,
    max_feature_bytes,
)

log = logging.getLogger(__name__)
POLL_S = 0.1
HEADER_BYTES = 1 << 20  # room for a feature header beside the largest payload
DOWN_S = 10.0  # a replica that failed a job is skipped this long
PROBE_S = 2.0  # a health check that takes longer counts as failed


@dataclass
class _Replica:
    endpoint: str
    channel: PushChannel
    health: grpc.Channel | None = None  # the replica's gRPC health service, when its address is known
    outstanding_tiles: int = 0
    down_until: float = 0.0  # time.monotonic(); skipped before this
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def answers_health_check(self) -> bool:
        if self.health is None:
            return False
        try:
            reply = health_pb2_grpc.HealthStub(self.health).Check(health_pb2.HealthCheckRequest(), timeout=PROBE_S)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class _Pending:
    """A job in flight: its first answer resolves `future`; further parts of the answer queue in `parts`."""

    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    tiles: int
    replica: _Replica | None = None
    parts: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: bool = False  # the requester is gone: parts that still arrive are released

    def push(self, result: Features | BaseException) -> None:
        """Hand over an answer or part (on the requester's loop)."""
        if self.closed:
            if isinstance(result, Features):
                result.release()
        elif self.future.done():
            self.parts.put_nowait(result)
        elif isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)

    def close(self) -> None:
        self.closed = True
        while not self.parts.empty():
            result = self.parts.get_nowait()
            if isinstance(result, Features):
                result.release()


def estimate_tiles(job: VisionJob) -> int:
    """Tiles the vision server will encode for a job (an upper bound when the header is unreadable)."""
    if job.kind == "video":
        return video_tiles(job.num_segments, job.max_tiles, job.use_thumbnail)
    total = 0
    for data, max_tiles in job.image_items:
        tiles = image_tiles(data, job.min_tiles, max_tiles, job.use_thumbnail)
        total += most_tiles(max_tiles, job.use_thumbnail) if tiles is None else tiles
    return total


class VisionClient:
    """Sends VisionJobs to vision servers and resolves one future per job when features arrive."""

    def __init__(self, config: DvDConfig, hidden_size: int) -> None:
        self.config = config
        self.hidden_size = hidden_size
        self.timeout_s = config.language.vision_timeout_s
        self.replica_timeout_s = config.vision.replica_timeout_s
        self.endpoints = list(config.vision_endpoints)
        self._replicas = [
            _Replica(endpoint, PushChannel(f"tcp://{endpoint}"), _health_channel(config, i))
            for i, endpoint in enumerate(self.endpoints)
        ]
        lc = config.language
        # Frames up to the largest answer a request may have, plus its header; features of unknown
        # width (a vision-only client) get the transport's default limit.
        largest = (max_feature_bytes(config.images.max_tiles_per_request, hidden_size) + HEADER_BYTES
                   if hidden_size else DEFAULT_MAX_FRAME_BYTES)
        self.receiver: FeatureReceiver = create_backend(config.transport).receiver(lc.host, lc.feature_port, largest)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive_loop, name="feature-receiver", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2 * POLL_S + 1)
        self.receiver.close()
        for replica in self._replicas:
            replica.channel.close()
            if replica.health is not None:
                replica.health.close()

    def outstanding_tiles(self) -> dict[str, int]:
        """Estimated tiles sent to each endpoint and not yet answered."""
        with self._lock:
            return {r.endpoint: r.outstanding_tiles for r in self._replicas}

    async def encode(self, job: VisionJob) -> Features:
        """Send one job and wait for its whole answer (parts joined); errors map to request-ending DvDErrors."""
        parts: list[Features] = []
        try:
            async for part in self.encode_parts(job):
                parts.append(part)
        except BaseException:
            for part in parts:
                part.release()
            raise
        if len(parts) == 1:
            return parts[0]
        tensor = torch.cat([p.tensor for p in parts])
        for part in parts:
            part.release()
        return Features(replace(parts[-1].header, row_offset=0, shape=tuple(tensor.shape),
                                payload_bytes=tensor.numel() * tensor.element_size()),
                        tensor, received_unix_s=parts[-1].received_unix_s)

    async def encode_parts(self, job: VisionJob) -> AsyncIterator[Features]:
        """Send one job and yield its answer's parts as they arrive, in row order (most answers
        have one part). Each part is the caller's to release. Errors map to request-ending
        DvDErrors; the first part may come from any replica that takes the job, the others
        must follow from the same one before the job's deadline."""
        loop = asyncio.get_running_loop()
        now = time.time()
        job = replace(job, reply_to=self.receiver.address, sent_unix_s=now, deadline_unix_s=now + self.timeout_s)
        frame = job.encode()
        deadline = loop.time() + self.timeout_s
        pending = _Pending(loop.create_future(), loop, estimate_tiles(job))
        tried: set[str] = set()
        claimed = False
        try:
            while True:
                replica = await self._send(job.job_id, frame, pending, tried)
                tried.add(replica.endpoint)
                last_chance = len(tried) >= len(self._replicas)
                features = await self._answer(pending, replica, deadline, last_chance)
                if features is None:
                    self._mark_down(replica, f"left job {job.job_id} unanswered and failed a health check")
                    continue
                if features.header.status == JobStatus.RESOURCE_EXHAUSTED and not last_chance:
                    pending.future = loop.create_future()
                    continue
                claimed = True
                break
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
            with self._lock:
                if self._pending.get(job.job_id) is pending:
                    del self._pending[job.job_id]
                self._assign(pending, None)
            pending.close()
            if not claimed:  # features that arrive for an abandoned job go back to the transport
                pending.future.add_done_callback(_release_unclaimed)

    async def _next_part(self, pending: _Pending, deadline: float) -> Features:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            result = await asyncio.wait_for(pending.parts.get(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the vision server did not send all of the features within {self.timeout_s:g} s") from None
        if isinstance(result, BaseException):
            raise result
        result.header.raise_for_status()
        return result

    async def _answer(self, pending: _Pending, replica: _Replica, deadline: float, last_chance: bool) -> Features | None:
        """The job's answer, or None when `replica` left it unanswered for replica_timeout_s and then
        failed a health check. On the last replica only the overall deadline applies."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"no vision server answered within {self.timeout_s:g} s")
            try:
                wait = remaining if last_chance else min(remaining, self.replica_timeout_s)
                return await asyncio.wait_for(asyncio.shield(pending.future), wait)
            except asyncio.TimeoutError:
                pass
            if not last_chance and not await asyncio.to_thread(replica.answers_health_check):
                return None

    async def _send(self, job_id: str, frame: bytes, pending: _Pending, tried: set[str]) -> _Replica:
        """Hand the job to the best replica that takes it; Unavailable if none does."""
        refused: list[str] = []
        while True:
            with self._lock:
                replica = self._choose(tried | set(refused))
                if replica is None:
                    break
                self._pending[job_id] = pending
                self._assign(pending, replica)
            if await asyncio.to_thread(self._push, replica, frame):
                return replica
            refused.append(replica.endpoint)
            self._mark_down(replica, "did not take a job")
        raise Unavailable(f"no vision server took the job (tried {', '.join(sorted(tried | set(refused)))})")

    def _choose(self, excluded: set[str]) -> _Replica | None:
        """The replica with the fewest outstanding tiles, preferring those not marked down."""
        candidates = [r for r in self._replicas if r.endpoint not in excluded]
        if not candidates:
            return None
        now = time.monotonic()
        return min(candidates, key=lambda r: (r.down_until > now, r.outstanding_tiles))

    @staticmethod
    def _push(replica: _Replica, frame: bytes) -> bool:
        with replica.send_lock:
            return replica.channel.send([frame])

    def _assign(self, pending: _Pending, replica: _Replica | None) -> None:
        """Move a job's tiles to `replica`'s outstanding count (None: the job is over). Holds _lock."""
        if pending.replica is not None:
            pending.replica.outstanding_tiles -= pending.tiles
        pending.replica = replica
        if replica is not None:
            replica.outstanding_tiles += pending.tiles

    def _mark_down(self, replica: _Replica, reason: str) -> None:
        with self._lock:
            replica.down_until = time.monotonic() + DOWN_S
        log.warning("vision server %s %s; trying others", replica.endpoint, reason)

    def _receive_loop(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.receiver.recv(POLL_S)
            except Exception:  # noqa: BLE001 - the receiver thread must outlive any one failure
                log.exception("receiving features failed")
                self._stop.wait(POLL_S)
                continue
            if frame is not None:
                self._deliver(frame)

    def _deliver(self, frame) -> None:
        """Resolve the job a received frame answers. Never raises: an unexpected error fails that
        job (when known) and the receiver goes on with the next frame."""
        pending: _Pending | None = None
        try:
            try:
                header = decode_header(frame.header)
            except WireError as exc:
                log.warning("dropped features with an undecodable header: %s", exc)
                frame.release()
                return
            with self._lock:
                pending = self._pending.get(header.job_id)
                if pending is not None:
                    source = pending.replica.endpoint if pending.replica else header.server_id
                    if header.is_last:  # else further parts of the answer follow
                        del self._pending[header.job_id]
                        self._assign(pending, None)
            if pending is None:
                log.info("features for an unknown or already answered job", extra={"job_id": header.job_id})
                frame.release()
                return
            try:
                result: Features | BaseException = decode_features(
                    header, frame.payload, keepalive=frame, hidden_size=self.hidden_size
                )
            except WireError as exc:
                frame.release()
                result = InternalError(f"malformed features from {source}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one bad frame must not end the receiver thread
            log.exception("handling received features failed")
            _release_quietly(frame)
            if pending is None:
                return
            result = InternalError(f"received features could not be handled: {type(exc).__name__}: {exc}")
        try:
            pending.loop.call_soon_threadsafe(pending.push, result)
        except RuntimeError:  # the requester's event loop is closed
            if isinstance(result, Features):
                result.release()


def _health_channel(config: DvDConfig, index: int) -> grpc.Channel | None:
    """A channel to replica `index`'s health service when the endpoints come from the vision section."""
    if config.language.vision_servers:
        return None
    vc = config.vision
    return grpc.insecure_channel(f"{vc.host}:{vc.grpc_port + index}")


def _release_quietly(frame) -> None:
    try:
        frame.release()
    except Exception:  # noqa: BLE001 - already failing; the payload is reclaimed at its timeout
        log.exception("releasing a received frame failed")


def _release_unclaimed(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()


def new_job_id() -> str:
    return uuid.uuid4().hex
