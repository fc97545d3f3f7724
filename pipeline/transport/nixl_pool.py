"""Host buffers registered with a NIXL agent, reused across payloads.

Registration pins memory and creates remote keys on RDMA hardware, which costs far more
than a copy, so both sides of the nixl transport keep registered buffers and hand them
out again. Buffers unused for `idle_s` are deregistered and freed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

ROUNDING = 1 << 20  # capacities are whole MiB, so slightly different sizes share buffers


@dataclass(eq=False)
class RegisteredBuffer:
    array: np.ndarray  # uint8, never resized
    registration: Any  # the agent's descriptor list, needed to deregister
    idle_since: float = 0.0
    in_use: bool = False

    @property
    def address(self) -> int:
        return self.array.ctypes.data

    @property
    def capacity(self) -> int:
        return self.array.nbytes


class RegisteredPool:
    """take() / give_back() from any thread; registration calls happen in take(), trim() and close()."""

    def __init__(self, agent: Any, idle_s: float) -> None:
        self._agent = agent
        self._idle_s = idle_s
        self._buffers: list[RegisteredBuffer] = []
        self._stranded: list[RegisteredBuffer] = []
        self.version = 0  # bumped on every (de)registration: the agent's metadata changed
        self._lock = threading.RLock()  # RLock: a GC finalizer may give a buffer back while it is held

    def take(self, nbytes: int) -> RegisteredBuffer:
        """The smallest free buffer that holds nbytes, or a newly registered one."""
        with self._lock:
            free = [b for b in self._buffers if not b.in_use and b.capacity >= nbytes]
            buffer = min(free, key=lambda b: b.capacity, default=None)
            if buffer is None:
                capacity = -(-nbytes // ROUNDING) * ROUNDING
                array = np.empty(capacity, dtype=np.uint8)
                registration = self._agent.register_memory([(array.ctypes.data, capacity, 0, "")], "DRAM")
                buffer = RegisteredBuffer(array, registration)
                self.version += 1
                self._buffers.append(buffer)
            buffer.in_use = True
            return buffer

    def give_back(self, buffer: RegisteredBuffer) -> None:
        with self._lock:
            buffer.in_use = False
            buffer.idle_since = time.monotonic()

    def retire(self, buffer: RegisteredBuffer) -> None:
        """Deregister and drop a buffer that must never be handed out again."""
        with self._lock:
            if buffer in self._buffers:
                self._buffers.remove(buffer)
                self._agent.deregister_memory(buffer.registration)
                self.version += 1

    def strand(self, buffer: RegisteredBuffer) -> None:
        """Take a buffer out of use for good without deregistering or freeing it (a transfer into
        it could not be stopped); it stays allocated until the process exits."""
        with self._lock:
            if buffer in self._buffers:
                self._buffers.remove(buffer)
            self._stranded.append(buffer)

    def trim(self) -> None:
        """Deregister buffers that stayed free longer than idle_s."""
        now = time.monotonic()
        with self._lock:
            for buffer in [b for b in self._buffers if not b.in_use and now - b.idle_since > self._idle_s]:
                self._buffers.remove(buffer)
                self._agent.deregister_memory(buffer.registration)
                self.version += 1

    @property
    def size(self) -> int:
        with self._lock:
            return len(self._buffers)

    def close(self) -> None:
        with self._lock:
            for buffer in self._buffers:
                self._agent.deregister_memory(buffer.registration)
            self._buffers.clear()
