"""A ZMQ socket's connection to its peer, as events: up when a handshake completes, down when the
connection drops (a killed peer's kernel closes it at once), on a thread of its own."""

from __future__ import annotations

import logging
import threading
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)
POLL_MS = 100
_EVENTS = {zmq.EVENT_HANDSHAKE_SUCCEEDED: True, zmq.EVENT_DISCONNECTED: False}


class PeerMonitor:
    """Calls `on_change(True)` when `socket` completes a handshake with its peer and
    `on_change(False)` when that connection drops. Start it before the socket connects."""

    def __init__(self, socket: zmq.Socket, on_change: Callable[[bool], None], name: str) -> None:
        self._events = socket.get_monitor_socket(sum(_EVENTS))
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(POLL_MS / 1000 * 5)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._events.poll(POLL_MS):
                    continue
                up = _EVENTS.get(recv_monitor_message(self._events)["event"])
                if up is None:
                    continue
                try:
                    self._on_change(up)
                except Exception:  # noqa: BLE001 - the monitor must outlive a failing callback
                    log.exception("handling a peer connection event failed")
        finally:
            self._events.close(linger=0)
