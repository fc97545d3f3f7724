"""Feature transports: the primitives in `base`, backends registered by name in `registry`."""

from pipeline.transport.base import (
    FeatureReceiver,
    FeatureSender,
    PeerTimeout,
    ReceivedFrame,
    TransportBackend,
    TransportError,
)
from pipeline.transport.registry import backend_names, create_backend

__all__ = [
    "FeatureReceiver",
    "FeatureSender",
    "PeerTimeout",
    "ReceivedFrame",
    "TransportBackend",
    "TransportError",
    "backend_names",
    "create_backend",
]
