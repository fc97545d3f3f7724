"""Shared-memory transport for one host: payloads in /dev/shm, a small handle over ZMQ.

Sender: keeps a pool of segments (shm_segments.py). For each payload it takes a free
segment (or creates one), copies the payload in, marks it sent with a new generation,
and sends the header plus a handle `DVDSHM1 <name> <generation> <nbytes>` over the TCP
backend's ZMQ socket. A reaper thread takes back segments that the receiver released,
retires segments the receiver has not released within `payload_timeout_s` (they are
unlinked and never reused, so a late reader never sees new data), and frees segments
that stayed unused for `pool_idle_s`. On start-up, segments left by dead processes are
swept; on close, all of this sender's segments are unlinked, and at process exit those of
every sender still open (abandon() does the same from another thread while a send blocks).

Receiver: maps a segment on first use and keeps the mapping while it is in use; the
payload it returns is a view of the mapping (no copy). Releasing the frame, or dropping
every view of its payload, marks the segment free for the sender.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from pipeline.config import TransportConfig
from pipeline.transport.base import (
    DEFAULT_MAX_FRAME_BYTES,
    FeatureReceiver,
    FeatureSender,
    ReceivedFrame,
    TransportBackend,
    TransportError,
)
from pipeline.transport.shm_segments import (
    CONTROL_BYTES,
    FREE,
    SENT,
    Segment,
    segment_prefix,
    sweep_stale_segments,
)
from pipeline.transport.tcp import TcpBackend, TcpReceiver, TcpSender

log = logging.getLogger(__name__)
HANDLE_MAGIC = b"DVDSHM1"
SEGMENT_ROUNDING = 1 << 20  # capacities are whole MiB, so slightly different sizes share segments
_SEGMENT_NUMBERS = itertools.count()  # process-wide: several senders in one process never collide


def encode_handle(name: str, generation: int, nbytes: int) -> bytes:
    return b"%s %s %d %d" % (HANDLE_MAGIC, name.encode(), generation, nbytes)


def parse_handle(data: bytes) -> tuple[str, int, int]:
    """(segment name, generation, payload bytes); ValueError if `data` is not a handle."""
    parts = data.split(b" ")
    if len(parts) != 4 or parts[0] != HANDLE_MAGIC:
        raise ValueError(f"not a shared-memory handle: {data[:64]!r}")
    return parts[1].decode("ascii"), int(parts[2]), int(parts[3])


@dataclass(eq=False)
class _Slot:
    segment: Segment
    sent_at: float | None = None  # monotonic time of the unreleased send; None while free
    idle_since: float = 0.0


class ShmSender(FeatureSender):
    def __init__(self, config: TransportConfig, control: TcpSender) -> None:
        self._control = control
        self._timeout_s = config.payload_timeout_s
        self._idle_s = config.pool_idle_s
        self._prefix = segment_prefix()
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        for name in sweep_stale_segments():
            log.info("removed a stale shared-memory segment", extra={"segment": name})
        interval = min(max(min(self._timeout_s, self._idle_s) / 4, 0.01), 1.0)
        self._reaper = threading.Thread(target=self._reap_loop, args=(interval,), name="shm-reaper", daemon=True)
        self._reaper.start()
        _OPEN_SENDERS.add(self)

    @property
    def segment_names(self) -> list[str]:
        """Names of the segments this sender holds now (free or sent)."""
        with self._lock:
            return [slot.segment.name for slot in self._slots]

    def send(self, address: str, header: bytes, payload: memoryview | bytes) -> None:
        data = memoryview(payload).cast("B")
        if data.nbytes == 0:
            self._control.send(address, header, b"")
            return
        slot = self._acquire(data.nbytes)
        segment = slot.segment
        segment.write(data)
        segment.generation += 1
        handle = encode_handle(segment.name, segment.generation, data.nbytes)
        try:
            self._control.send(address, header, handle)
        except TransportError:
            with self._lock:
                self._mark_free(slot, time.monotonic())
            raise

    def _acquire(self, nbytes: int) -> _Slot:
        """The smallest free segment that fits, or a new one; it is marked sent before it is returned."""
        now = time.monotonic()
        with self._lock:
            if self._closed:
                raise TransportError("the shared-memory sender is closed")
            self._collect_released(now)
            free = [s for s in self._slots if s.sent_at is None and s.segment.capacity >= nbytes]
            slot = min(free, key=lambda s: s.segment.capacity, default=None)
            if slot is None:
                capacity = -(-nbytes // SEGMENT_ROUNDING) * SEGMENT_ROUNDING
                try:
                    slot = _Slot(Segment.create(f"{self._prefix}{next(_SEGMENT_NUMBERS)}", capacity))
                except OSError as exc:
                    raise TransportError(f"cannot allocate {capacity} bytes of shared memory: {exc}") from exc
                self._slots.append(slot)
            slot.segment.state = SENT
            slot.sent_at = now
            return slot

    def _mark_free(self, slot: _Slot, now: float) -> None:
        slot.segment.state = FREE
        slot.sent_at = None
        slot.idle_since = now

    def _collect_released(self, now: float) -> None:
        for slot in self._slots:
            if slot.sent_at is not None and slot.segment.state == FREE:
                slot.sent_at = None
                slot.idle_since = now

    def _reap_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.reap()

    def reap(self) -> None:
        """Take back released segments; retire timed-out and long-idle ones."""
        now = time.monotonic()
        with self._lock:
            self._collect_released(now)
            keep = []
            for slot in self._slots:
                timed_out = slot.sent_at is not None and now - slot.sent_at > self._timeout_s
                idle = slot.sent_at is None and now - slot.idle_since > self._idle_s
                if timed_out:
                    log.warning("reclaimed a payload the receiver never released", extra={"segment": slot.segment.name})
                if timed_out or idle:
                    _retire(slot.segment)
                else:
                    keep.append(slot)
            self._slots = keep

    def abandon(self) -> None:
        """Unlink every segment now; a send blocked in another thread keeps its mapping until close()."""
        self._stop.set()
        locked = self._lock.acquire(timeout=1.0)  # at exit a daemon thread may hold it; unlink anyway
        try:
            self._closed = True
            for slot in list(self._slots):
                slot.segment.unlink()
        finally:
            if locked:
                self._lock.release()
        _OPEN_SENDERS.discard(self)

    def close(self) -> None:
        self._stop.set()
        self._reaper.join(timeout=5)
        with self._lock:
            self._closed = True
            for slot in self._slots:
                _retire(slot.segment)
            self._slots.clear()
        _OPEN_SENDERS.discard(self)
        self._control.close()


_OPEN_SENDERS: weakref.WeakSet[ShmSender] = weakref.WeakSet()


@atexit.register
def _abandon_open_senders() -> None:
    for sender in list(_OPEN_SENDERS):
        sender.abandon()


def _retire(segment: Segment) -> None:
    segment.unlink()
    segment.close()


@dataclass(eq=False)
class _Mapped:
    segment: Segment
    outstanding: int = 0
    last_used: float = 0.0


class _Lease:
    """One received payload; releasing it hands the segment back to the sender once."""

    def __init__(self, receiver: ShmReceiver, mapped: _Mapped, generation: int) -> None:
        self._receiver = receiver
        self._mapped = mapped
        self._generation = generation
        self._done = False

    def release(self) -> None:
        with self._receiver._lock:
            if self._done:
                return
            self._done = True
            mapped = self._mapped
            mapped.outstanding -= 1
            mapped.last_used = time.monotonic()
            if not mapped.segment.mapping.closed and mapped.segment.generation == self._generation:
                mapped.segment.state = FREE


class ShmReceiver(FeatureReceiver):
    def __init__(self, config: TransportConfig, control: TcpReceiver) -> None:
        self._control = control
        self._idle_s = config.pool_idle_s
        self._mapped: dict[str, _Mapped] = {}
        self._lock = threading.RLock()  # RLock: a GC finalizer may release a lease while it is held
        sweep_stale_segments()

    @property
    def address(self) -> str:
        return self._control.address

    @property
    def mapped_segments(self) -> list[str]:
        """Names of the segments this receiver has mapped now."""
        with self._lock:
            return list(self._mapped)

    def recv(self, timeout_s: float) -> ReceivedFrame | None:
        self._unmap_idle()
        frame = self._control.recv(timeout_s)
        if frame is None:
            return None
        handle = bytes(frame.payload)
        frame.release()
        if not handle:
            return ReceivedFrame(header=frame.header, payload=memoryview(b""))
        try:
            return self._frame(frame.header, *parse_handle(handle))
        except (OSError, ValueError) as exc:
            # An empty payload fails validation, so the request fails with this frame's header.
            log.warning("cannot map a shared-memory payload: %s", exc)
            return ReceivedFrame(header=frame.header, payload=memoryview(b""))

    def _frame(self, header: bytes, name: str, generation: int, nbytes: int) -> ReceivedFrame:
        with self._lock:
            mapped = self._mapped.get(name)
            if mapped is None:
                mapped = self._mapped[name] = _Mapped(Segment.open(name))
            segment = mapped.segment
            if segment.generation != generation or segment.state != SENT:
                raise ValueError(f"segment {name} no longer holds generation {generation}")
            if not 0 < nbytes <= segment.capacity:
                raise ValueError(f"segment {name}: {nbytes} bytes do not fit {segment.capacity}")
            view = np.frombuffer(segment.mapping, dtype=np.uint8, count=nbytes, offset=CONTROL_BYTES)
            mapped.outstanding += 1
        lease = _Lease(self, mapped, generation)
        weakref.finalize(view, lease.release)  # a frame dropped without release() still frees its segment
        return ReceivedFrame(header=header, payload=memoryview(view), keepalive=view, on_release=lease.release)

    def _unmap_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            for name, mapped in list(self._mapped.items()):
                if mapped.outstanding == 0 and now - mapped.last_used > self._idle_s:
                    if _try_close(mapped.segment):
                        del self._mapped[name]

    def close(self) -> None:
        self._control.close()
        with self._lock:
            for name, mapped in list(self._mapped.items()):
                if _try_close(mapped.segment):
                    del self._mapped[name]


def _try_close(segment: Segment) -> bool:
    """Unmap unless a released payload is still viewed somewhere (then a later pass does it)."""
    try:
        segment.close()
        return True
    except BufferError:
        return False


class ShmBackend(TransportBackend):
    def sender(self) -> FeatureSender:
        return ShmSender(self.config, TcpBackend(self.config).sender())

    def receiver(self, host: str, port: int, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FeatureReceiver:
        return ShmReceiver(self.config, TcpBackend(self.config).receiver(host, port, max_frame_bytes))
