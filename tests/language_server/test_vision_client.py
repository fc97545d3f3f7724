"""The feature receiver thread survives any failure while handling a frame, and fails the job."""

from __future__ import annotations

import asyncio

import pytest
import torch

import language_server.vision_client as vision_client
from language_server.vision_client import VisionClient, _Pending
from pipeline.config import config_from_dict
from pipeline.errors import InternalError
from pipeline.transport import create_backend
from pipeline.wire import FeatureHeader, encode_features
from tests.conftest import port_overrides

HIDDEN = 16
WAIT_S = 30.0


def _config():
    raw: dict = {"language": {}, "vision": {}}
    for dotted, value in port_overrides().items():
        section, key = dotted.split(".")
        raw[section][key] = value
    raw["transport"] = {"backend": "tcp"}
    return config_from_dict(raw)


def test_an_unexpected_error_fails_that_job_and_the_receiver_goes_on(monkeypatch):
    config = _config()
    client = VisionClient(config, hidden_size=HIDDEN)
    sender = create_backend(config.transport).sender()
    real_decode = vision_client.decode_features
    calls: list[str] = []

    def decode_failing_first(header, *args, **kwargs):
        calls.append(header.job_id)
        if len(calls) == 1:
            raise RuntimeError("unexpected bug")
        return real_decode(header, *args, **kwargs)

    monkeypatch.setattr(vision_client, "decode_features", decode_failing_first)

    async def answer(job_id: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), loop, tiles=1)
        with client._lock:
            client._pending[job_id] = pending
        header, payload = encode_features(FeatureHeader(job_id, "r", tile_tokens=(4,)), torch.zeros(4, HIDDEN))
        await asyncio.to_thread(sender.send, client.receiver.address, header, payload)
        return await asyncio.wait_for(pending.future, WAIT_S)

    async def main():
        with pytest.raises(InternalError, match="unexpected bug"):
            await answer("first")
        features = await answer("second")
        assert features.tensor.shape == (4, HIDDEN)
        features.release()

    try:
        asyncio.run(main())
    finally:
        sender.close()
        client.close()
    assert calls == ["first", "second"]


def test_the_feature_socket_refuses_frames_larger_than_any_answer():
    import zmq

    from pipeline.wire import max_feature_bytes

    config = _config()
    client = VisionClient(config, hidden_size=HIDDEN)
    try:
        limit = client.receiver._socket.getsockopt(zmq.MAXMSGSIZE)
    finally:
        client.close()
    largest = max_feature_bytes(config.images.max_tiles_per_request, HIDDEN)
    assert largest < limit <= largest + vision_client.HEADER_BYTES


class _PartsServer:
    """A stand-in vision server on the job port: answers each job with the parts `parts(job)` lists,
    as (row_offset, rows) of a 12-row answer (three 4-row tiles)."""

    def __init__(self, config, parts) -> None:
        import threading

        from pipeline.wire.channels import PullChannel

        self.jobs = PullChannel(f"tcp://{config.vision.host}:{config.vision.job_port}")
        self.sender = create_backend(config.transport).sender()
        self.parts = parts
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        from pipeline.wire import VisionJob

        while not self.stop.is_set():
            message = self.jobs.recv(0.1)
            if message is None:
                continue
            job = VisionJob.decode(message[0])
            for offset, rows in self.parts(job):
                header = FeatureHeader(job.job_id, "r", tile_tokens=(4, 4, 4), row_offset=offset)
                frame, payload = encode_features(header, rows)
                self.sender.send(job.reply_to, frame, payload)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT_S)
        self.sender.close()
        self.jobs.close()


ROWS = torch.arange(12 * HIDDEN, dtype=torch.float32).reshape(12, HIDDEN)


def _run_with_parts(parts, timeout_s: float = WAIT_S):
    """Encode one job against a server answering with `parts`; (what each call gave, pending jobs after)."""
    from dataclasses import replace

    from language_server.vision_client import new_job_id
    from pipeline.wire import VisionJob

    config = _config()
    config = replace(config, language=replace(config.language, vision_timeout_s=timeout_s))
    server = _PartsServer(config, parts)
    client = VisionClient(config, hidden_size=HIDDEN)

    def job():
        return VisionJob(job_id=new_job_id(), request_id="r", kind="image", data=b"x", reply_to="")

    async def main():
        got = []
        async for part in client.encode_parts(job()):
            got.append((part.header.row_offset, part.tensor.clone()))
            part.release()
        whole = await client.encode(job())
        joined = (whole.header.row_offset, whole.header.shape, whole.tensor.clone())
        whole.release()
        return got, joined

    try:
        outcome = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        outcome = exc
    finally:
        pending = dict(client._pending)
        server.close()
        client.close()
    return outcome, pending


def test_an_answer_in_parts_is_yielded_part_by_part_and_joined_by_encode():
    (got, joined), pending = _run_with_parts(lambda job: [(0, ROWS[:4]), (4, ROWS[4:9]), (9, ROWS[9:])])
    assert [offset for offset, _ in got] == [0, 4, 9]
    assert torch.equal(torch.cat([rows for _, rows in got]), ROWS)
    assert joined[:2] == (0, (12, HIDDEN)) and torch.equal(joined[2], ROWS)
    assert pending == {}


def test_a_part_out_of_order_fails_the_job():
    outcome, pending = _run_with_parts(lambda job: [(0, ROWS[:4]), (8, ROWS[8:])])
    assert isinstance(outcome, InternalError) and "starts at row 8, not at row 4" in str(outcome)
    assert pending == {}


def test_a_part_that_never_comes_ends_at_the_deadline():
    from pipeline.errors import DeadlineExceeded

    outcome, pending = _run_with_parts(lambda job: [(0, ROWS[:4])], timeout_s=1.0)
    assert isinstance(outcome, DeadlineExceeded) and "did not send all of the features" in str(outcome)
    assert pending == {}
