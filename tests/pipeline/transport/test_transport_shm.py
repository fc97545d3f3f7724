"""The shm backend: zero-copy receive, release and timeouts free segments, stale segments are swept."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.config import TransportConfig
from pipeline.transport import TransportError
from pipeline.transport.shm_segments import SHM_DIR, encode_handle, sweep_stale_segments
from pipeline.transport.tcp import TcpBackend
from tests.pipeline.transport.helpers import Pairs, our_segments, receive, send_features
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT_S = 10.0


def mapped_shm_files() -> list[str]:
    """/dev/shm files this process has mapped now."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if "/dev/shm/dvd-shm-" in line})


@pytest.fixture(autouse=True)
def nothing_left_in_dev_shm():
    yield
    assert wait_until(lambda: not our_segments(), 5.0), our_segments()


@pytest.fixture
def make_pair() -> Iterator[Pairs]:
    pairs = Pairs("shm")
    yield pairs
    pairs.close()


def test_the_received_tensor_views_the_shared_segment(make_pair):
    sender, receiver = make_pair()
    tensor = send_features(sender, receiver, 0)
    got = receive(receiver)
    (name,) = sender.segment_names
    address = got.tensor.data_ptr()
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    owners = [m[-1] for m in maps if int(m[0].split("-")[0], 16) <= address < int(m[0].split("-")[1], 16)]
    assert owners == [str(SHM_DIR / name)]
    assert torch.equal(got.tensor, tensor)
    got.release()


def test_release_frees_the_segment_for_reuse_and_idle_segments_are_unlinked(make_pair):
    sender, receiver = make_pair(pool_idle_s=0.3)
    send_features(sender, receiver, 0)
    got = receive(receiver)
    first = sender.segment_names
    got.release()
    second = send_features(sender, receiver, 1)
    again = receive(receiver)
    assert sender.segment_names == first  # the released segment carried the next payload
    assert torch.equal(again.tensor, second)
    again.release()
    # Unused for pool_idle_s: the sender unlinks it, the receiver unmaps it on its next poll.
    assert wait_until(lambda: not our_segments())
    assert wait_until(lambda: receiver.recv(0.01) is None and not mapped_shm_files())
    assert receiver.mapped_segments == []


def test_a_dropped_frame_frees_its_segment_like_release(make_pair):
    sender, receiver = make_pair()
    send_features(sender, receiver, 0)
    got = receive(receiver)
    first = sender.segment_names
    del got
    gc.collect()
    send_features(sender, receiver, 1)
    receive(receiver).release()
    assert sender.segment_names == first


def test_an_unreleased_payload_is_reclaimed_after_the_timeout_without_being_overwritten(make_pair):
    sender, receiver = make_pair(payload_timeout_s=0.3, pool_idle_s=30.0)
    tensor = send_features(sender, receiver, 0)
    held = receive(receiver)
    (name,) = sender.segment_names
    assert wait_until(lambda: name not in our_segments())  # unlinked by the sender's reaper
    assert sender.segment_names == []
    later = send_features(sender, receiver, 1)  # goes to a new segment, not the timed-out one
    got = receive(receiver)
    assert name not in sender.segment_names
    assert torch.equal(got.tensor, later) and torch.equal(held.tensor, tensor)
    got.release()
    held.release()


def test_a_handle_naming_a_file_outside_our_segments_is_refused(make_pair):
    _, receiver = make_pair()
    control = TcpBackend(TransportConfig()).sender()
    try:
        for name in ("../../etc/passwd", "dvd-shm-1-2-3/../../etc/passwd", "dvd-shm-999999999-1-1"):
            control.send(receiver.address, b"header", encode_handle(name, 1, 10))
            frame = receiver.recv(timeout_s=TIMEOUT_S)
            assert frame is not None and frame.header == b"header"
            assert frame.payload.nbytes == 0  # fails validation downstream with this header's job id
        control.send(receiver.address, b"header", b"DVDSHM1 garbage")
        assert receiver.recv(timeout_s=TIMEOUT_S).payload.nbytes == 0
    finally:
        control.close()


CRASHING_SENDER = """
import os, sys
from pipeline.config import TransportConfig
from pipeline.transport import TransportError, create_backend
sender = create_backend(TransportConfig(backend="shm")).sender()
sender.send(sys.argv[1], b"header", bytes(range(256)) * 4096)
print(sender.segment_names[0], flush=True)
sys.stdin.readline()  # the test has received the payload
os._exit(9)  # dies without closing: its segment stays in /dev/shm
"""


def test_segments_of_a_crashed_sender_are_swept_by_the_next_one(make_pair):
    sender, receiver = make_pair()
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_SENDER, receiver.address],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        frame = receiver.recv(timeout_s=60)
        assert frame is not None, "the child's payload did not arrive"
        name = child.stdout.readline().strip()
        child.stdin.write("crash\n")
        child.stdin.flush()
        assert child.wait(TIMEOUT_S) == 9
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(TIMEOUT_S)
    assert bytes(frame.payload[:256]) == bytes(range(256))  # the receiver can still read it
    frame.release()
    assert (SHM_DIR / name).exists()
    assert name in sweep_stale_segments()  # what every new sender and receiver runs first
    assert not (SHM_DIR / name).exists()


def test_the_sweep_keeps_segments_of_live_processes(make_pair):
    sender, receiver = make_pair()
    send_features(sender, receiver, 0)
    got = receive(receiver)
    assert sweep_stale_segments() == []
    assert our_segments() == sender.segment_names
    got.release()


def test_a_full_dev_shm_fails_the_send_and_leaves_no_file(make_pair, monkeypatch):
    sender, receiver = make_pair()

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipeline.transport.shm_segments.os.posix_fallocate", no_space)
    with pytest.raises(TransportError, match="cannot allocate .* bytes of shared memory"):
        send_features(sender, receiver, 0)
    assert our_segments() == [] and sender.segment_names == []
    monkeypatch.undo()
    tensor = send_features(sender, receiver, 1)  # works again once there is room
    got = receive(receiver)
    assert torch.equal(got.tensor, tensor)
    got.release()
