"""The receiving half of the shm transport: payloads read in place from shared-memory segments.

The receiver maps a segment on first use and keeps the mapping while it is in use; the
payload it returns is a view of the mapping (no copy). Releasing the frame, or dropping
every view of its payload, marks the segment free for the sender. Mappings unused for
`pool_idle_s` are closed.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from pipeline.config import TransportConfig
from pipeline.transport.base import FeatureReceiver, ReceivedFrame
from pipeline.transport.shm_segments import CONTROL_BYTES, FREE, SENT, Segment, parse_handle, sweep_stale_segments
from pipeline.transport.tcp import TcpReceiver

log = logging.getLogger(__name__)


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
