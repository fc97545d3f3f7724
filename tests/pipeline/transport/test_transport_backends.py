"""Every transport backend: bit-exact round trips, concurrent senders, senders without a receiver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from pipeline.config import TransportConfig
from pipeline.transport import FeatureReceiver, FeatureSender, TransportError, create_backend
from pipeline.wire import FeatureHeader, JobStatus, encode_features, error_header
from tests.pipeline.transport.helpers import our_segments, receive
from tests.waiting import wait_until

BACKENDS = ["tcp", "shm", "nixl"]
TIMEOUT_S = 20.0


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    return _available(request.param)


@pytest.fixture(params=["shm", "nixl"])
def pooling_backend_name(request) -> str:
    return _available(request.param)


def _available(name: str) -> str:
    if name == "nixl":
        pytest.importorskip("nixl._api", reason="the optional 'rdma' extra (nixl) is not installed")
    return name


@pytest.fixture
def pair(backend_name) -> Iterator[tuple[FeatureSender, FeatureReceiver]]:
    backend = create_backend(TransportConfig(backend=backend_name, send_timeout_s=5.0))
    receiver = backend.receiver("127.0.0.1", 0)
    sender = backend.sender()
    yield sender, receiver
    sender.close()
    receiver.close()
    assert wait_until(lambda: not our_segments(), 5.0), our_segments()


def features(job_id: str, tiles: int, hidden: int, dtype: torch.dtype, seed: int) -> tuple[bytes, memoryview, torch.Tensor]:
    tensor = torch.randn(tiles * 256, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
    frame, payload = encode_features(FeatureHeader(job_id=job_id, request_id="r", tile_tokens=(256,) * tiles), tensor)
    return frame, payload, tensor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("tiles", "hidden"), [(1, 64), (7, 896), (13, 4096)])
def test_round_trip_is_bit_exact(pair, dtype, tiles, hidden):
    sender, receiver = pair
    for seed in range(2):  # the second payload reuses pooled memory where a backend pools
        frame, payload, tensor = features(f"job-{seed}", tiles, hidden, dtype, seed)
        sender.send(receiver.address, frame, payload)
        got = receive(receiver)
        assert got.tensor.dtype == dtype and got.tensor.shape == tensor.shape
        assert torch.equal(got.tensor.view(torch.uint8), tensor.view(torch.uint8))
        got.release()
        assert got.tensor is None
    assert receiver.recv(timeout_s=0.05) is None


def test_an_error_header_without_payload_arrives(pair):
    sender, receiver = pair
    frame, payload = encode_features(error_header("bad", "r", JobStatus.INVALID_INPUT, "not an image"), None)
    sender.send(receiver.address, frame, payload)
    got = receive(receiver)
    assert got.header.status == JobStatus.INVALID_INPUT and got.header.error_message == "not an image"
    assert got.tensor is None


def test_payloads_stay_intact_while_held(pair):
    """Pooling must never hand out memory a receiver still holds."""
    sender, receiver = pair
    held = []
    for seed in range(4):
        frame, payload, tensor = features(f"job-{seed}", 2, 256, torch.bfloat16, seed)
        sender.send(receiver.address, frame, payload)
        held.append((receive(receiver), tensor))
    for got, tensor in held:
        assert torch.equal(got.tensor, tensor)
        got.release()


def test_concurrent_senders_deliver_every_payload_intact(backend_name):
    backend = create_backend(TransportConfig(backend=backend_name, send_timeout_s=5.0))
    receiver = backend.receiver("127.0.0.1", 0)
    senders, per_sender = 4, 5
    expected: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        sender = backend.sender()
        try:
            for k in range(per_sender):
                frame, payload, tensor = features(f"s{index}-{k}", 1 + k % 3, 512, torch.bfloat16, 100 * index + k)
                expected[f"s{index}-{k}"] = tensor
                sender.send(receiver.address, frame, payload)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            # Close only after every payload was read (shm and nixl keep payloads in sender memory).
            if not done.wait(TIMEOUT_S):
                errors.append(TimeoutError("the receiver did not finish"))
            sender.close()

    done = threading.Event()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(senders)]
    for thread in threads:
        thread.start()
    received = {}
    try:
        for _ in range(senders * per_sender):
            got = receive(receiver)
            received[got.header.job_id] = got.tensor.clone()
            got.release()
    finally:
        done.set()
        for thread in threads:
            thread.join(TIMEOUT_S)
        receiver.close()
    assert not errors, errors
    assert received.keys() == expected.keys()
    for job_id, tensor in expected.items():
        assert torch.equal(received[job_id], tensor), job_id
    assert wait_until(lambda: not our_segments(), 5.0), our_segments()


def test_send_without_a_receiver_fails_in_time_and_keeps_nothing(backend_name):
    backend = create_backend(TransportConfig(backend=backend_name, send_timeout_s=0.3, pool_idle_s=0.1))
    sender = backend.sender()
    frame, payload, _ = features("lost", 1, 256, torch.bfloat16, 0)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError, match="no receiver took the features"):
            sender.send("tcp://127.0.0.1:9", frame, payload)
        assert time.monotonic() - started < 5.0
        # The payload memory went back to the pool at once, and the idle pool is freed.
        assert wait_until(lambda: not our_segments(), 5.0), our_segments()
        if backend_name == "nixl":
            assert sender.pending == 0
            assert wait_until(lambda: (sender.reap(), sender.pooled_buffers)[1] == 0, 5.0)
    finally:
        sender.close()


def test_a_receiver_that_goes_away_leaves_no_payload_behind(pooling_backend_name):
    """The message is queued, the receiver closes without taking it: the sender reclaims it."""
    backend_name = pooling_backend_name
    backend = create_backend(TransportConfig(backend=backend_name, payload_timeout_s=0.3, pool_idle_s=0.1))
    receiver = backend.receiver("127.0.0.1", 0)
    sender = backend.sender()
    try:
        frame, payload, _ = features("orphan", 2, 256, torch.bfloat16, 0)
        sender.send(receiver.address, frame, payload)
        receiver.close()
        assert wait_until(lambda: not our_segments(), 5.0), our_segments()
        if backend_name == "nixl":
            assert wait_until(lambda: (sender.reap(), sender.pending)[1] == 0, 5.0)
            assert wait_until(lambda: (sender.reap(), sender.pooled_buffers)[1] == 0, 5.0)
    finally:
        sender.close()
