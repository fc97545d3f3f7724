"""vision_server.outbox and the server's use of it: a sender that cannot be made, a requester that is
gone, a payload that cannot be delivered, and shared memory at shutdown."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Iterator

import pytest
import torch

from pipeline.config import TransportConfig
from pipeline.transport import TransportError, create_backend
from pipeline.wire import FeatureHeader, JobStatus, VisionJob, decode_features, decode_header, error_header
from tests.pipeline.transport.helpers import our_segments
from tests.waiting import wait_until
from vision_server.batcher import TileBatcher
from vision_server.outbox import Outbox
from vision_server.server import VisionServer
from vision_server.answers import JobResult

TIMEOUT_S = 10.0
GONE = "tcp://127.0.0.1:9"  # nothing listens there: a language server that has gone away
STREAMING = types.SimpleNamespace(vision=types.SimpleNamespace(stream_features=True))  # the config the server reads


def job(name: str, reply_to: str = GONE, deadline: float = 0.0, data: bytes = b"image bytes") -> VisionJob:
    return VisionJob(job_id=name, request_id="r", kind="image", data=data, reply_to=reply_to, deadline_unix_s=deadline)


def answer(name: str, reply_to: str = GONE, rows: int = 256, deadline: float = 0.0) -> JobResult:
    header = FeatureHeader(job_id=name, request_id="r", tile_tokens=(rows,))
    return JobResult(job(name, reply_to, deadline), header, torch.ones(rows, 64, dtype=torch.bfloat16))


class Counter:
    """A thread-safe `done` / `_finished` callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1


@pytest.fixture
def receiver() -> Iterator:
    rx = create_backend(TransportConfig()).receiver("127.0.0.1", 0)
    yield rx
    rx.close()


def test_a_transport_that_cannot_send_fails_when_the_outbox_is_made():
    with pytest.raises(TransportError, match="cannot create a 'nixl' feature sender: .*'NO_SUCH_PLUGIN'"):
        Outbox(TransportConfig(backend="nixl", rdma_plugin="NO_SUCH_PLUGIN"))


def test_a_sender_that_cannot_be_made_later_drops_the_answer_without_raising(monkeypatch):
    outbox = Outbox(TransportConfig(send_timeout_s=0.2))
    done = Counter()
    try:
        outbox.put(answer("a", "tcp://127.0.0.1:10"), done)  # the first lane takes the checked sender

        def refuse() -> None:
            raise TransportError("no sender today")

        monkeypatch.setattr(outbox, "_new_sender", refuse)
        outbox.put(answer("b", "tcp://127.0.0.1:11"), done)  # a second lane needs a new sender
        assert wait_until(lambda: done.calls == 2, TIMEOUT_S)
    finally:
        outbox.close(TIMEOUT_S)


def test_the_batch_thread_survives_an_outbox_that_raises_and_frees_every_slot():
    finished = Counter()
    results = [JobResult(job(f"j{i}"), FeatureHeader(job_id=f"j{i}", request_id="r"), None) for i in range(3)]

    def broken_put(result: JobResult, done=None) -> None:
        raise RuntimeError("the outbox is broken")

    server = types.SimpleNamespace(
        _stop=threading.Event(), batcher=TileBatcher(8, 0), _finished=finished,
        worker=types.SimpleNamespace(run_batch=lambda batch, on_part: results[: len(batch)]), config=STREAMING,
        outbox=types.SimpleNamespace(put=broken_put),
    )
    server._answer_batch = lambda batch: VisionServer._answer_batch(server, batch)
    thread = threading.Thread(target=VisionServer._batch_loop, args=(server,), daemon=True)
    thread.start()
    try:
        for tiles in (1, 2):
            server.batcher.put(types.SimpleNamespace(tiles=tiles, ready_monotonic=0.0))
            assert wait_until(lambda: len(server.batcher) == 0, TIMEOUT_S)
        assert wait_until(lambda: finished.calls == 2, TIMEOUT_S)
        assert thread.is_alive()
    finally:
        server._stop.set()
        thread.join(TIMEOUT_S)


def test_a_gone_requester_holds_no_slot_and_its_answers_drain_quickly():
    outbox = Outbox(TransportConfig(send_timeout_s=0.5), max_queued=3, max_features=2)
    finished, done = Counter(), Counter()
    server = types.SimpleNamespace(
        _finished=finished, outbox=types.SimpleNamespace(put=lambda result: outbox.put(result, done)),
        worker=types.SimpleNamespace(run_batch=lambda batch, on_part: [answer(p) for p in batch]), config=STREAMING,
    )
    try:
        started = time.monotonic()
        VisionServer._answer_batch(server, ["a", "b", "c", "d", "e"])
        assert finished.calls == 5  # the slots are free before any answer has been tried
        assert wait_until(lambda: done.calls == 5, TIMEOUT_S)
        # one send timed out; the next answers to that address were skipped or did not fit the lane
        assert time.monotonic() - started < 2.5
    finally:
        outbox.close(TIMEOUT_S)


def test_answers_with_rows_beyond_the_lanes_bound_become_resource_exhausted(receiver):
    outbox = Outbox(TransportConfig(send_timeout_s=0.5), max_lanes=1, max_features=2, probation_lanes=1)  # one lane for all
    try:
        outbox.put(answer("stuck", GONE))  # the lane blocks on it for send_timeout_s, holding its rows
        assert wait_until(lambda: outbox._lane(GONE).items.empty(), TIMEOUT_S)
        for name in ("kept", "busy-1", "busy-2"):
            outbox.put(answer(name, receiver.address))
        got = {}
        for _ in range(3):
            frame = receiver.recv(TIMEOUT_S)
            assert frame is not None, "an answer is missing"
            header = decode_header(frame.header)
            got[header.job_id] = header
        assert got["kept"].ok
        assert got["busy-1"].status == got["busy-2"].status == JobStatus.RESOURCE_EXHAUSTED
        assert "2 answers to" in got["busy-1"].error_message
    finally:
        outbox.close(TIMEOUT_S)


def test_answers_to_expired_jobs_are_not_sent_and_results_hold_no_media(receiver):
    outbox = Outbox(TransportConfig())
    try:
        late = answer("late", receiver.address, deadline=time.time() - 1)
        assert late.job.data == b"" and late.job.images == ()
        outbox.put(late)
        outbox.put(answer("on-time", receiver.address, deadline=time.time() + 60))
        frame = receiver.recv(TIMEOUT_S)
        assert frame is not None and decode_header(frame.header).job_id == "on-time"
        assert receiver.recv(0.2) is None
    finally:
        outbox.close(TIMEOUT_S)


def test_features_that_cannot_be_delivered_become_an_error_header(monkeypatch):
    config = TransportConfig(backend="shm")
    rx = create_backend(config).receiver("127.0.0.1", 0)
    outbox = Outbox(config)

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipeline.transport.shm_segments.os.posix_fallocate", no_space)
    try:
        outbox.put(answer("full", rx.address))
        bad = answer("bad", rx.address)
        bad.rows = torch.ones(3, 3, 3)  # not [rows, hidden]: encoding it fails
        outbox.put(bad)
        got = {}
        for _ in range(2):
            frame = rx.recv(TIMEOUT_S)
            assert frame is not None, "no answer arrived"
            header = decode_header(frame.header)
            got[header.job_id] = decode_features(header, frame.payload).header
        assert {h.status for h in got.values()} == {JobStatus.INTERNAL}
        assert "could not deliver the features" in got["full"].error_message
        assert "shared memory" in got["full"].error_message
        assert "2-D" in got["bad"].error_message
    finally:
        outbox.close(TIMEOUT_S)
        rx.close()
    assert wait_until(lambda: not our_segments(), 5.0), our_segments()


def test_a_lane_blocked_at_shutdown_leaves_no_shared_memory():
    config = TransportConfig(backend="shm", send_timeout_s=5.0)
    rx = create_backend(config).receiver("127.0.0.1", 0)
    outbox = Outbox(config)
    try:
        outbox.put(answer("first", rx.address))
        frame = rx.recv(TIMEOUT_S)
        assert frame is not None
        frame.release()
    finally:
        rx.close()  # the language server goes away
    outbox.put(answer("second", rx.address))  # its lane now blocks for send_timeout_s
    assert wait_until(lambda: len(our_segments()) >= 1, TIMEOUT_S)
    started = time.monotonic()
    outbox.close(0.3)
    assert time.monotonic() - started < 2.0
    assert our_segments() == []


def test_an_error_answer_goes_out_without_a_payload(receiver):
    outbox = Outbox(TransportConfig())
    try:
        header = error_header("busy", "r", JobStatus.RESOURCE_EXHAUSTED, "4 jobs are already queued")
        outbox.put(JobResult(job("busy", receiver.address), header, None))
        frame = receiver.recv(TIMEOUT_S)
        assert frame is not None and decode_header(frame.header).status == JobStatus.RESOURCE_EXHAUSTED
    finally:
        outbox.close(TIMEOUT_S)


def test_a_hundred_dead_reply_addresses_do_not_delay_a_working_language_server(receiver):
    import socket

    from tests.conftest import free_ports

    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never speaks ZMQ: a handshake that never ends
    dead = [f"tcp://127.0.0.1:{port}" for port in free_ports(50)]
    dead += [f"tcp://127.0.0.1:{listener.getsockname()[1]}"] * 50
    outbox = Outbox(TransportConfig(send_timeout_s=5.0))
    try:
        outbox.put(answer("first", receiver.address))  # the language server has taken an answer before
        assert receiver.recv(TIMEOUT_S) is not None
        for index, address in enumerate(dead):
            outbox.put(answer(f"dead-{index}", address, rows=4))
        started = time.monotonic()
        outbox.put(answer("legit", receiver.address))
        frame = receiver.recv(TIMEOUT_S)
        took = time.monotonic() - started
        assert frame is not None and decode_header(frame.header).job_id == "legit"
        assert took < 1.0, f"the working language server's answer waited {took:.2f} s behind dead addresses"
    finally:
        outbox.close(0.5)
        listener.close()


def test_a_job_whose_reply_address_did_not_take_its_last_answer_is_dropped_before_any_work(receiver):
    outbox = Outbox(TransportConfig(send_timeout_s=5.0))  # an address is skipped for one send timeout
    submitted = []
    server = types.SimpleNamespace(
        outbox=outbox, config=types.SimpleNamespace(vision=types.SimpleNamespace(max_queued_jobs=8)),
        _admitted_lock=threading.Lock(), _admitted=0, server_id="vision-test", _prepare=None,
        worker=types.SimpleNamespace(pool=types.SimpleNamespace(submit=lambda *args: submitted.append(args[1]))),
    )
    try:
        assert not outbox.unreachable(GONE)
        outbox.put(answer("lost", GONE))
        assert wait_until(lambda: outbox.unreachable(GONE), TIMEOUT_S)  # its send timed out
        outbox.put(answer("first", receiver.address))
        assert receiver.recv(TIMEOUT_S) is not None and not outbox.unreachable(receiver.address)
        for name, reply_to in (("to-gone", GONE), ("to-receiver", receiver.address)):
            VisionServer._admit(server, [job(name, reply_to).encode()], time.monotonic())
        assert [j.job_id for j in submitted] == ["to-receiver"]  # nothing was decoded or encoded for the other
    finally:
        outbox.close(TIMEOUT_S)
