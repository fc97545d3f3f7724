"""Shared-memory transport for one host: payloads in /dev/shm, a small handle over ZMQ.

The sender (shm_sender.py) copies each payload into a segment of its pool (shm_segments.py)
and sends the header plus a handle `DVDSHM1 <name> <generation> <nbytes>` over the TCP
backend's ZMQ socket; the receiver (shm_receiver.py) maps the segment and returns a view of
the payload (no copy). Releasing the frame, or dropping every view of its payload, hands the
segment back to the sender; a payload that is never released is reclaimed after
`payload_timeout_s`, and segments left by dead processes are swept.
"""

from __future__ import annotations

from pipeline.transport.base import DEFAULT_MAX_FRAME_BYTES, FeatureReceiver, FeatureSender, TransportBackend
from pipeline.transport.shm_receiver import ShmReceiver
from pipeline.transport.shm_sender import ShmSender
from pipeline.transport.tcp import TcpBackend


class ShmBackend(TransportBackend):
    def sender(self) -> FeatureSender:
        return ShmSender(self.config, TcpBackend(self.config).sender())

    def receiver(self, host: str, port: int, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FeatureReceiver:
        return ShmReceiver(self.config, TcpBackend(self.config).receiver(host, port, max_frame_bytes))
