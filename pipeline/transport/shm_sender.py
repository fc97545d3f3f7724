"""The sending half of the shm transport: payloads copied into a pool of shared-memory segments.

For each payload the sender takes a free segment (or creates one), copies the payload in,
marks it sent with a new generation, and sends the header plus a handle (shm_segments.py)
over the TCP backend's ZMQ socket. A reaper thread takes back segments that the receiver
released, retires segments the receiver has not released within `payload_timeout_s` (they
are unlinked and never reused, so a late reader never sees new data), and frees segments
that stayed unused for `pool_idle_s`. On start-up, segments left by dead processes are
swept; on close, all of this sender's segments are unlinked, and at process exit those of
every sender still open (abandon() does the same from another thread while a send blocks).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass

from pipeline.config import TransportConfig
from pipeline.transport.base import FeatureSender, TransportError
from pipeline.transport.shm_segments import FREE, SENT, Segment, encode_handle, segment_prefix, sweep_stale_segments
from pipeline.transport.tcp import TcpSender

log = logging.getLogger(__name__)
SEGMENT_ROUNDING = 1 << 20  # capacities are whole MiB, so slightly different sizes share segments
_SEGMENT_NUMBERS = itertools.count()  # process-wide: several senders in one process never collide


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
