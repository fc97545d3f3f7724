"""Small ZMQ wrappers for control messages (jobs): one PUSH per peer, one PULL per server."""

from __future__ import annotations

from typing import Callable

import zmq

from pipeline.wire.curve import CurveKeys, secure_bound, secure_connecting
from pipeline.wire.peer_monitor import PeerMonitor


class PullChannel:
    """Binds a PULL socket and yields whole multipart messages; a peer that sends a frame larger
    than max_message_bytes is disconnected by ZMQ before the frame is buffered."""

    def __init__(
        self, address: str, high_water_mark: int = 1024, max_message_bytes: int = 64 << 20, keys: CurveKeys | None = None,
    ) -> None:
        self._socket = zmq.Context.instance().socket(zmq.PULL)
        secure_bound(self._socket, keys)
        self._socket.setsockopt(zmq.RCVHWM, high_water_mark)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout_s: float) -> list[bytes] | None:
        """The next message, or None if none arrived within timeout_s."""
        if not self._socket.poll(int(timeout_s * 1000)):
            return None
        return self._socket.recv_multipart()

    def close(self) -> None:
        self._socket.close(linger=0)


class PushChannel:
    """Connects a PUSH socket to one peer; sends never block longer than the send timeout.
    `on_peer(up)` is told when the connection to the peer comes up or drops."""

    def __init__(
        self, address: str, send_timeout_s: float = 1.0, high_water_mark: int = 1024,
        on_peer: Callable[[bool], None] | None = None, keys: CurveKeys | None = None,
    ) -> None:
        self.address = address
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        secure_connecting(self._socket, keys)
        self._socket.setsockopt(zmq.SNDHWM, high_water_mark)
        self._socket.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        self._socket.setsockopt(zmq.IMMEDIATE, 1)  # do not queue for a peer that is not connected
        self._socket.setsockopt(zmq.LINGER, 0)
        self._monitor = PeerMonitor(self._socket, on_peer, f"peer-{address}") if on_peer else None
        self._socket.connect(address)

    def send(self, frames: list[bytes]) -> bool:
        """Hand a message to the socket; False if the peer did not take it in time."""
        try:
            self._socket.send_multipart(frames)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
        self._socket.close(linger=0)
