"""The language server's side of the vision pipeline: send jobs, await validated features."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace

from pipeline.channels import PushChannel
from pipeline.config import DvDConfig
from pipeline.errors import DeadlineExceeded, InternalError, InvalidRequest, ResourceExhausted, Unavailable
from pipeline.transport import FeatureReceiver, create_backend
from pipeline.wire import Features, JobStatus, VisionJob, WireError, decode_features, decode_header

log = logging.getLogger(__name__)
POLL_S = 0.1


@dataclass
class _Pending:
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    endpoint: str
    tiles_hint: int


class VisionClient:
    """Sends VisionJobs to vision servers and resolves one future per job when features arrive."""

    def __init__(self, config: DvDConfig, hidden_size: int) -> None:
        self.config = config
        self.hidden_size = hidden_size
        self.timeout_s = config.language.vision_timeout_s
        self.endpoints = list(config.vision_endpoints)
        self._channels = {e: PushChannel(f"tcp://{e}") for e in self.endpoints}
        self._outstanding = {e: 0 for e in self.endpoints}
        lc = config.language
        self.receiver: FeatureReceiver = create_backend(config.transport).receiver(lc.host, lc.feature_port)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive_loop, name="feature-receiver", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2 * POLL_S + 1)
        self.receiver.close()
        for channel in self._channels.values():
            channel.close()

    async def encode(self, job: VisionJob) -> Features:
        """Send one job and wait for its features; errors map to request-ending DvDErrors."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = _with(job, reply_to=self.receiver.address, sent=time.time(), deadline=time.time() + self.timeout_s)
        endpoint = self._dispatch(job, _Pending(future, loop, "", job.max_tiles + 1))
        try:
            features = await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"vision server {endpoint} did not answer within {self.timeout_s:g} s"
            ) from None
        finally:
            with self._lock:  # still pending after a timeout or a cancellation: forget the job
                abandoned = self._pending.pop(job.job_id, None)
                if abandoned is not None:
                    self._outstanding[abandoned.endpoint] -= abandoned.tiles_hint
        header = features.header
        if header.status == JobStatus.OK:
            return features
        if header.status == JobStatus.INVALID_INPUT:
            raise InvalidRequest(header.error_message)
        if header.status == JobStatus.RESOURCE_EXHAUSTED:
            raise ResourceExhausted(f"vision server busy: {header.error_message}")
        if header.status == JobStatus.DEADLINE_EXCEEDED:
            raise DeadlineExceeded(f"vision job expired: {header.error_message}")
        raise InternalError(f"vision server failed: {header.error_message}")

    def _dispatch(self, job: VisionJob, pending: _Pending) -> str:
        """Send to the endpoint with the fewest outstanding tiles, falling back to the others."""
        frame = job.encode()
        with self._lock:
            order = sorted(self.endpoints, key=lambda e: self._outstanding[e])
            for endpoint in order:
                pending.endpoint = endpoint
                self._pending[job.job_id] = pending
                if self._channels[endpoint].send([frame]):
                    self._outstanding[endpoint] += pending.tiles_hint
                    return endpoint
                self._pending.pop(job.job_id, None)
        raise Unavailable(f"no vision server is reachable (tried {', '.join(order)})")

    def _receive_loop(self) -> None:
        while not self._stop.is_set():
            frame = self.receiver.recv(POLL_S)
            if frame is None:
                continue
            try:
                header = decode_header(frame.header)
            except WireError as exc:
                log.warning("dropped features with an undecodable header: %s", exc)
                frame.release()
                continue
            with self._lock:
                pending = self._pending.pop(header.job_id, None)
                if pending is not None:
                    self._outstanding[pending.endpoint] -= pending.tiles_hint
            if pending is None:
                log.info("features for an unknown or abandoned job", extra={"job_id": header.job_id})
                frame.release()
                continue
            try:
                features = decode_features(header, frame.payload, keepalive=frame, hidden_size=self.hidden_size)
                result: Features | BaseException = features
            except WireError as exc:
                frame.release()
                result = InternalError(f"malformed features from {pending.endpoint}: {exc}")
            pending.loop.call_soon_threadsafe(_resolve, pending.future, result)


def _resolve(future: asyncio.Future, result: Features | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _with(job: VisionJob, reply_to: str, sent: float, deadline: float) -> VisionJob:
    return replace(job, reply_to=reply_to, sent_unix_s=sent, deadline_unix_s=deadline)


def new_job_id() -> str:
    return uuid.uuid4().hex
