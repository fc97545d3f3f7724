"""The feature receiver thread: every frame that arrives on the language server's feature port
goes to the job it answers, on that job's event loop.

A job is expected (`expect`) before it is sent. The first frame of its answer resolves its
`PendingJob.future`; further parts of the answer queue in `PendingJob.parts`. A frame for a job
nobody waits for any more goes straight back to the transport.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from pipeline.config import DvDConfig
from pipeline.errors import InternalError, Unavailable
from pipeline.transport import FeatureReceiver, create_backend
from pipeline.transport.base import DEFAULT_MAX_FRAME_BYTES
from pipeline.wire import FeatureHeader, Features, HeaderError, WireError, decode_features, decode_header, max_feature_bytes

log = logging.getLogger(__name__)
POLL_S = 0.1
HEADER_BYTES = 1 << 20  # room for a feature header beside the largest payload


class ReplicaLost(Unavailable):
    """The vision server a job was sent to closed its connection before answering all of it."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(f"vision server {endpoint} went away (its connection closed) before answering")
        self.endpoint = endpoint


@dataclass
class PendingJob:
    """A job in flight: its first answer resolves `future`; further parts of the answer queue in `parts`."""

    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    on_answered: Callable[[], None] | None = None  # called (holding the inbox's lock) when the last part arrives
    source: str = ""  # the vision server it was last sent to
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


class FeatureInbox:
    """Receives feature frames on a thread of its own and resolves the job each one answers."""

    def __init__(self, config: DvDConfig, hidden_size: int | None) -> None:
        """`hidden_size`: the width features must have (None: unknown, a vision-only client)."""
        lc = config.language
        self.hidden_size = hidden_size
        # Frames up to the largest answer a request may have, plus its header; features of unknown
        # width get the transport's default limit.
        largest = (max_feature_bytes(config.images.max_tiles_per_request, hidden_size) + HEADER_BYTES
                   if hidden_size else DEFAULT_MAX_FRAME_BYTES)
        self.receiver: FeatureReceiver = create_backend(config.transport).receiver(lc.host, lc.feature_port, largest)
        self.feature_host = lc.feature_host
        self._pending: dict[str, PendingJob] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive_loop, name="feature-receiver", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """Where vision servers send the features (a job's reply_to): the bound address, with its host
        replaced by language.feature_host when that is set."""
        bound = self.receiver.address
        if not self.feature_host:
            return bound
        host = f"[{self.feature_host}]" if ":" in self.feature_host else self.feature_host
        return f"tcp://{host}:{bound.rpartition(':')[2]}"

    def expect(self, job_id: str, pending: PendingJob) -> None:
        """Route the frames that answer `job_id` to `pending` (until its last part arrives)."""
        with self._lock:
            self._pending[job_id] = pending

    def forget(self, job_id: str, pending: PendingJob) -> None:
        """Stop routing `job_id`'s frames to `pending` (frames that still come go back to the transport)."""
        with self._lock:
            if self._pending.get(job_id) is pending:
                del self._pending[job_id]

    def lose_source(self, endpoint: str) -> int:
        """Fail every job still waiting for (part of) an answer from `endpoint` with ReplicaLost;
        returns how many. A job that another server may still answer is the requester's to resend."""
        with self._lock:
            lost = [pending for pending in self._pending.values() if pending.source == endpoint]
        for pending in lost:
            try:
                pending.loop.call_soon_threadsafe(pending.push, ReplicaLost(endpoint))
            except RuntimeError:  # the requester's event loop is closed
                pass
        return len(lost)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2 * POLL_S + 1)
        self.receiver.close()

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

    def _deliver(self, frame) -> None:  # noqa: ANN001 - a transport's received frame
        """Resolve the job a received frame answers. Never raises: an unexpected error fails that
        job (when known) and the receiver goes on with the next frame."""
        pending: PendingJob | None = None
        try:
            try:
                header = decode_header(frame.header)
            except HeaderError as exc:  # names its job: fail it now rather than at its timeout
                frame.release()
                pending = self._claim(exc.job_id, last=True)
                if pending is None:
                    return
                result: Features | BaseException = InternalError(
                    f"malformed features from {_sender(exc.server_id, pending.source)}: {exc}"
                )
            except WireError as exc:
                log.warning("dropped features with an undecodable header: %s", exc)
                frame.release()
                return
            else:
                pending = self._claim(header.job_id, header.is_last)
                if pending is None:
                    log.info("features for an unknown or already answered job", extra={"job_id": header.job_id})
                    frame.release()
                    return
                result = self._decode(frame, header, _sender(header.server_id, pending.source))
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

    def _claim(self, job_id: str, last: bool) -> PendingJob | None:
        """The job a frame answers (None: nobody waits for it); its last frame ends the routing."""
        with self._lock:
            pending = self._pending.get(job_id)
            if pending is not None and last:  # else further parts of the answer follow
                del self._pending[job_id]
                if pending.on_answered is not None:
                    pending.on_answered()
        return pending

    def _decode(self, frame, header: FeatureHeader, sender: str) -> Features | BaseException:  # noqa: ANN001
        """The frame's features, or the error its job fails with when they are malformed."""
        try:
            return decode_features(header, frame.payload, keepalive=frame, hidden_size=self.hidden_size)
        except WireError as exc:
            frame.release()
            return InternalError(f"malformed features from {sender}: {exc}")


def _sender(server_id: str, endpoint: str) -> str:
    """The vision server that sent a frame, by its own id and the endpoint the job went to."""
    if server_id and endpoint and endpoint not in server_id:
        return f"{server_id} ({endpoint})"
    return server_id or endpoint or "an unnamed vision server"


def _release_quietly(frame) -> None:  # noqa: ANN001 - a transport's received frame
    try:
        frame.release()
    except Exception:  # noqa: BLE001 - already failing; the payload is reclaimed at its timeout
        log.exception("releasing a received frame failed")
