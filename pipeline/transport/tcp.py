"""TCP transport over ZMQ: header and payload as one two-frame message, payload not copied."""

from __future__ import annotations

from collections import OrderedDict

import zmq

from pipeline.transport.base import (
    DEFAULT_MAX_FRAME_BYTES,
    FeatureReceiver,
    FeatureSender,
    PeerTimeout,
    ReceivedFrame,
    TransportBackend,
    TransportError,
)
from pipeline.wire.curve import CurveKeys, deployment_keys, secure_bound, secure_connecting

MAX_SOCKETS = 64  # reply addresses a sender keeps a socket for; the least recently used is closed


class TcpSender(FeatureSender):
    def __init__(
        self, context: zmq.Context, send_timeout_s: float, high_water_mark: int, max_sockets: int = MAX_SOCKETS,
        keys: CurveKeys | None = None,
    ) -> None:
        self._context = context
        self._keys = keys
        self._timeout_ms = int(send_timeout_s * 1000)
        self._hwm = high_water_mark
        self._max_sockets = max_sockets
        self._sockets: OrderedDict[str, zmq.Socket] = OrderedDict()

    def _socket(self, address: str) -> zmq.Socket:
        sock = self._sockets.get(address)
        if sock is not None:
            self._sockets.move_to_end(address)
            return sock
        sock = self._context.socket(zmq.PUSH)
        try:
            sock.setsockopt(zmq.SNDHWM, self._hwm)
            sock.setsockopt(zmq.SNDTIMEO, self._timeout_ms)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not connected
            sock.setsockopt(zmq.LINGER, 0)
            secure_connecting(sock, self._keys)
            sock.connect(address)
        except BaseException:
            sock.close(linger=0)
            raise
        while len(self._sockets) >= self._max_sockets:
            _, oldest = self._sockets.popitem(last=False)
            oldest.close(linger=0)
        self._sockets[address] = sock
        return sock

    def send(self, address: str, header: bytes, payload: memoryview | bytes) -> None:
        try:
            self._socket(address).send_multipart([header, payload], copy=False)
        except zmq.Again:
            raise PeerTimeout(f"no receiver took the features at {address} within {self._timeout_ms} ms") from None
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot send to {address}: {exc}") from exc

    @property
    def open_sockets(self) -> int:
        return len(self._sockets)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()


class TcpReceiver(FeatureReceiver):
    def __init__(
        self, context: zmq.Context, host: str, port: int, high_water_mark: int,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, keys: CurveKeys | None = None,
    ) -> None:
        self._socket = context.socket(zmq.PULL)
        secure_bound(self._socket, keys)
        self._socket.setsockopt(zmq.RCVHWM, high_water_mark)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(f"tcp://{host}:{port}")
        self._address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def address(self) -> str:
        return self._address

    def recv(self, timeout_s: float) -> ReceivedFrame | None:
        if not self._socket.poll(int(timeout_s * 1000)):
            return None
        frames = self._socket.recv_multipart(copy=False)
        if len(frames) != 2:
            header = frames[0].bytes if frames else b""
            return ReceivedFrame(header=header, payload=memoryview(b""), keepalive=None)
        header, payload = frames
        return ReceivedFrame(header=header.bytes, payload=payload.buffer, keepalive=payload)

    def close(self) -> None:
        self._socket.close(linger=0)


class TcpBackend(TransportBackend):
    def sender(self) -> FeatureSender:
        return TcpSender(zmq.Context.instance(), self.config.send_timeout_s, self.config.high_water_mark,
                         keys=self._keys())

    def receiver(self, host: str, port: int, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FeatureReceiver:
        return TcpReceiver(zmq.Context.instance(), host, port, self.config.high_water_mark, max_frame_bytes,
                           keys=self._keys())

    def _keys(self) -> CurveKeys | None:
        try:
            return deployment_keys(self.config.auth, self.config.curve_key_file)
        except RuntimeError as exc:
            raise TransportError(str(exc)) from None
