"""The feature-transport interface: vision servers send, language servers receive.

A backend provides a `FeatureSender` and a `FeatureReceiver`. Primitives:

* `FeatureReceiver.address` - the string a VisionJob carries in `reply_to`;
* `FeatureReceiver.recv(timeout_s)` - the next `ReceivedFrame`, or None on timeout;
* `ReceivedFrame.release()` - the receiver is done with the payload (a backend may free it);
* `FeatureSender.send(address, header, payload)` - deliver one header and its raw payload
  to a receiver's address, or raise TransportError within the send timeout (PeerTimeout
  when the receiver did not take it in time);
* `close()` on both; `FeatureSender.abandon()` frees out-of-process memory from another thread.

Headers are serialized `dvd.v1.FeatureHeader` messages, opaque to the transport; payloads
are raw tensor bytes that are never pickled or wrapped in protobuf. Senders and receivers
are used from one thread each; `ReceivedFrame.release()` may be called from any thread.

Backends (registered in `__init__.py`): `tcp` sends the payload inline over ZMQ; `shm` and
`nixl` send a small handle over the same ZMQ socket and keep the payload in shared or
registered memory, which is reclaimed on release, when dropped, or after a timeout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.config import TransportConfig

DEFAULT_MAX_FRAME_BYTES = 4 << 30  # a receiver disconnects a peer that sends a larger frame


class TransportError(RuntimeError):
    """A payload could not be delivered or received."""


class PeerTimeout(TransportError):
    """The receiver did not take a message within the send timeout (it is gone or stalled)."""


@dataclass
class ReceivedFrame:
    """One header and its payload as they came off the transport."""

    header: bytes
    payload: memoryview
    keepalive: Any = None  # object owning the payload memory (a ZMQ frame, a shared-memory map)
    on_release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give the payload memory back to the transport; the payload must not be used after."""
        if self.on_release is not None:
            callback, self.on_release = self.on_release, None
            callback()
        self.keepalive = None


class FeatureSender(ABC):
    """Delivers feature payloads to receivers named by address."""

    @abstractmethod
    def send(self, address: str, header: bytes, payload: memoryview | bytes) -> None:
        """Deliver one message; raise TransportError if it cannot be handed over in time."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets and any memory still held."""

    def abandon(self) -> None:
        """Free what outlives this process (shared-memory files) while another thread may still be
        inside send(); sockets are left to process exit. The sender must not be used afterwards."""


class FeatureReceiver(ABC):
    """Collects feature payloads sent to one address."""

    @property
    @abstractmethod
    def address(self) -> str:
        """The address senders must use (goes into VisionJob.reply_to)."""

    @abstractmethod
    def recv(self, timeout_s: float) -> ReceivedFrame | None:
        """The next message, or None if none arrived within timeout_s."""

    @abstractmethod
    def close(self) -> None:
        """Stop receiving and release resources."""


class TransportBackend(ABC):
    """Factory for one backend's senders and receivers."""

    def __init__(self, config: TransportConfig) -> None:
        self.config = config

    @abstractmethod
    def sender(self) -> FeatureSender:
        """A sender for the vision side."""

    @abstractmethod
    def receiver(self, host: str, port: int, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FeatureReceiver:
        """A receiver bound at host:port for the language side. A peer that sends a frame (or
        announces a payload) larger than max_frame_bytes is refused."""
