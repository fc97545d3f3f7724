"""The transport registry and the TCP backend."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TransportConfig
from pipeline.transport import TransportError, backend_names, create_backend
from pipeline.wire import FeatureHeader, decode_features, decode_header, encode_features
from tests.waiting import wait_until


def test_registry_knows_tcp_and_rejects_unknown_names():
    assert "tcp" in backend_names()
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


def test_tcp_sender_keeps_few_sockets_and_none_for_a_bad_address():
    import os

    import zmq

    from pipeline.transport import PeerTimeout
    from pipeline.transport.tcp import TcpSender

    sender = TcpSender(zmq.Context.instance(), send_timeout_s=0.01, high_water_mark=4, max_sockets=3)
    try:
        for port in range(9, 14):  # nobody listens: each send times out
            with pytest.raises(PeerTimeout):
                sender.send(f"tcp://127.0.0.1:{port}", b"header", b"")
        assert sender.open_sockets == 3
        open_files = len(os.listdir("/proc/self/fd"))
        for i in range(50):
            with pytest.raises(TransportError, match="cannot send to"):
                sender.send(f"not-an-endpoint-{i}", b"header", b"")
        assert sender.open_sockets == 3
        # ZMQ's reaper thread frees a closed socket's descriptors shortly after close()
        assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= open_files + 2, 10.0)
    finally:
        sender.close()


def test_frames_over_the_receivers_limit_are_refused():
    from pipeline.wire.channels import PullChannel, PushChannel

    backend = create_backend(TransportConfig(backend="tcp", send_timeout_s=5))
    receiver = backend.receiver("127.0.0.1", 0, max_frame_bytes=4096)
    jobs = PullChannel("tcp://127.0.0.1:0", max_message_bytes=4096)
    senders = [backend.sender(), backend.sender()]
    pushes = [PushChannel(jobs.address, send_timeout_s=5), PushChannel(jobs.address, send_timeout_s=5)]
    try:
        senders[0].send(receiver.address, b"header", b"x" * 8192)
        assert pushes[0].send([b"y" * 8192])
        senders[1].send(receiver.address, b"header", b"x" * 4000)  # a new peer, under the limit
        assert pushes[1].send([b"y" * 4000])
        frame = receiver.recv(timeout_s=10)
        assert frame is not None and frame.payload.nbytes == 4000
        assert jobs.recv(10) == [b"y" * 4000]
        assert receiver.recv(timeout_s=0.2) is None and jobs.recv(0.2) is None
    finally:
        for end in [*senders, *pushes, receiver, jobs]:
            end.close()


def test_the_job_socket_limit_covers_the_largest_allowed_job():
    from pipeline.config import DvDConfig
    from vision_server.jobs import max_job_bytes

    config = DvDConfig()
    assert max_job_bytes(config) > max(config.video.max_video_bytes, config.language.max_request_bytes)
    assert max_job_bytes(config) < 1 << 30


def test_every_configurable_backend_is_registered() -> None:
    from pipeline.config.sections import TRANSPORT_BACKENDS

    assert sorted(TRANSPORT_BACKENDS) == backend_names()
