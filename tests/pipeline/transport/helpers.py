"""Pieces shared by the transport tests: sender/receiver pairs, one feature round trip, our segments."""

from __future__ import annotations

import torch

from pipeline.config import TransportConfig
from pipeline.transport import FeatureReceiver, FeatureSender, create_backend
from pipeline.transport.shm_segments import SHM_DIR, segment_prefix
from pipeline.wire import FeatureHeader, decode_features, decode_header, encode_features

TIMEOUT_S = 10.0


class Pairs:
    """Makes connected (sender, receiver) pairs of one backend and closes them all at the end."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.made: list = []

    def __call__(self, **settings) -> tuple[FeatureSender, FeatureReceiver]:
        backend = create_backend(TransportConfig(backend=self.backend, **settings))
        receiver, sender = backend.receiver("127.0.0.1", 0), backend.sender()
        self.made.extend([sender, receiver])
        return sender, receiver

    def close(self) -> None:
        for end in self.made:
            end.close()


def send_features(sender: FeatureSender, receiver: FeatureReceiver, seed: int, rows: int = 512) -> torch.Tensor:
    """Send `rows` random BF16 feature rows to `receiver`; the tensor sent."""
    tensor = torch.randn(rows, 256, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    frame, payload = encode_features(FeatureHeader(job_id=f"j{seed}", request_id="r", tile_tokens=(rows,)), tensor)
    sender.send(receiver.address, frame, payload)
    return tensor


def receive(receiver: FeatureReceiver, timeout_s: float = TIMEOUT_S):
    """The next features to arrive, decoded (their tensor keeps the frame alive)."""
    frame = receiver.recv(timeout_s=timeout_s)
    assert frame is not None, "nothing arrived"
    return decode_features(decode_header(frame.header), frame.payload, keepalive=frame)


def our_segments() -> list[str]:
    """Shared-memory segments created by this process."""
    return sorted(p.name for p in SHM_DIR.glob(segment_prefix() + "*"))
