"""The transport registry and the TCP backend."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TransportConfig
from pipeline.transport import TransportError, create_backend, registered_backends
from pipeline.wire import FeatureHeader, decode_features, decode_header, encode_features


def test_registry_knows_tcp_and_rejects_unknown_names():
    assert "tcp" in registered_backends()
    config = TransportConfig()
    object.__setattr__(config, "backend", "carrier-pigeon")  # bypass the config check on purpose
    with pytest.raises(TransportError, match="unknown transport backend 'carrier-pigeon'"):
        create_backend(config)


def test_tcp_delivers_header_and_payload():
    backend = create_backend(TransportConfig(backend="tcp"))
    receiver = backend.receiver("127.0.0.1", 0)
    sender = backend.sender()
    try:
        tensor = torch.randn(1024, 256).to(torch.bfloat16)
        frame, payload = encode_features(FeatureHeader(job_id="a", request_id="r", tile_tokens=(256,) * 4), tensor)
        sender.send(receiver.address, frame, payload)
        received = receiver.recv(timeout_s=10)
        assert received is not None
        features = decode_features(decode_header(received.header), received.payload, keepalive=received)
        assert torch.equal(features.tensor, tensor)
        assert receiver.recv(timeout_s=0.05) is None
    finally:
        sender.close()
        receiver.close()


def test_tcp_send_without_a_receiver_times_out():
    backend = create_backend(TransportConfig(backend="tcp", send_timeout_s=0.2))
    sender = backend.sender()
    try:
        with pytest.raises(TransportError, match="no receiver took the features"):
            sender.send("tcp://127.0.0.1:9", b"header", b"payload")
    finally:
        sender.close()
