"""The nixl backend in UCX's TCP and shared-memory modes: buffers are reused, bad descriptors refused."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("nixl._api", reason="the optional 'rdma' extra (nixl) is not installed")

from pipeline.config import TransportConfig  # noqa: E402
from pipeline.transport import TransportError, create_backend  # noqa: E402
from pipeline.transport.nixl import encode_descriptor  # noqa: E402
from pipeline.transport.tcp import TcpBackend  # noqa: E402
from tests.pipeline.transport.helpers import Pairs, receive, send_features  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

TIMEOUT_S = 10.0


@pytest.fixture
def make_pair(monkeypatch) -> Iterator[Pairs]:
    # The backend writes UCX_TLS / UCX_NET_DEVICES into the environment; monkeypatch restores them.
    for name in ("UCX_TLS", "UCX_NET_DEVICES"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    pairs = Pairs("nixl")
    yield pairs
    pairs.close()


@pytest.mark.parametrize("transports", ["tcp", ""], ids=["ucx-tcp", "ucx-auto"])
def test_buffers_are_reused_once_released_and_read(make_pair, transports):
    sender, receiver = make_pair(rdma_transports=transports)
    assert os.environ.get("UCX_TLS") == (transports or None)  # what UCX read when the agents started
    first = send_features(sender, receiver, 0)
    got = receive(receiver)
    assert torch.equal(got.tensor, first)
    address = got.tensor.data_ptr()
    got.release()
    # The read's completion notification hands the sender's buffer back.
    assert wait_until(lambda: (sender.reap(), sender.pending)[1] == 0)
    second = send_features(sender, receiver, 1)
    again = receive(receiver)
    assert torch.equal(again.tensor, second)
    assert again.tensor.data_ptr() == address  # the receiver's released buffer took the next payload
    assert sender.pooled_buffers == 1 and receiver.pooled_buffers == 1
    again.release()


def test_a_held_buffer_is_not_handed_out_and_a_dropped_one_comes_back(make_pair):
    sender, receiver = make_pair()
    send_features(sender, receiver, 0)
    held = receive(receiver)
    send_features(sender, receiver, 1)
    other = receive(receiver)
    assert other.tensor.data_ptr() != held.tensor.data_ptr()
    assert receiver.pooled_buffers == 2
    address = held.tensor.data_ptr()
    del held  # dropped without release(): the finalizer gives the buffer back
    other.release()
    send_features(sender, receiver, 2)
    send_features(sender, receiver, 3)
    third, fourth = receive(receiver), receive(receiver)
    assert {third.tensor.data_ptr(), fourth.tensor.data_ptr()} >= {address}
    assert receiver.pooled_buffers == 2


def test_idle_buffers_are_deregistered(make_pair):
    sender, receiver = make_pair(pool_idle_s=0.2)
    send_features(sender, receiver, 0)
    receive(receiver).release()
    assert wait_until(lambda: (sender.reap(), sender.pooled_buffers)[1] == 0)
    assert wait_until(lambda: receiver.recv(0.01) is None and receiver.pooled_buffers == 0)


def test_bad_descriptors_give_an_empty_payload_and_receiving_goes_on(make_pair):
    sender, receiver = make_pair()
    control = TcpBackend(TransportConfig()).sender()
    try:
        for descriptor in (b"DVDNIXL1", encode_descriptor(4096, 10, 1, "nobody", b"not metadata"), b"garbage"):
            control.send(receiver.address, b"header", descriptor)
            frame = receiver.recv(timeout_s=TIMEOUT_S)
            assert frame is not None and frame.header == b"header" and frame.payload.nbytes == 0
    finally:
        control.close()
    tensor = send_features(sender, receiver, 5)
    got = receive(receiver)
    assert torch.equal(got.tensor, tensor)
    got.release()


def test_an_unknown_plugin_is_named():
    with pytest.raises(TransportError, match="NIXL plugin 'NOPE' is not available"):
        create_backend(TransportConfig(backend="nixl", rdma_plugin="NOPE")).sender()


def test_a_payload_over_the_limit_is_refused_before_a_buffer_is_taken(make_pair):
    backend = create_backend(TransportConfig(backend="nixl", rdma_transports="tcp"))
    receiver, sender = backend.receiver("127.0.0.1", 0, max_frame_bytes=4096), backend.sender()
    make_pair.made.extend([sender, receiver])
    send_features(sender, receiver, 1)  # 512 x 256 bf16 rows: 256 KiB
    frame = receiver.recv(timeout_s=TIMEOUT_S)
    assert frame is not None and frame.payload.nbytes == 0
    assert receiver.pooled_buffers == 0


def test_a_buffer_whose_failed_read_cannot_be_released_is_never_reused(make_pair, monkeypatch):
    sender, receiver = make_pair(rdma_transports="tcp")
    agent = receiver._agent

    def refuse(handle) -> None:
        raise RuntimeError("transfer still in flight")

    monkeypatch.setattr(agent, "transfer", lambda handle: "ERR")
    monkeypatch.setattr(agent, "release_xfer_handle", refuse)
    send_features(sender, receiver, 2)
    frame = receiver.recv(timeout_s=TIMEOUT_S)
    assert frame is not None and frame.payload.nbytes == 0
    assert receiver.pooled_buffers == 0 and len(receiver._pool._stranded) == 1
