"""Answers in parts: yielded part by part in row order (and joined whole), a part out of order
fails the job, a part that never comes ends at the deadline."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch

from language_server.vision_client import VisionClient
from pipeline.errors import InternalError
from pipeline.transport import create_backend
from pipeline.wire import FeatureHeader, Features, VisionJob, encode_features
from tests.language_server.test_feature_inbox import HIDDEN, WAIT_S, _config


async def joined_answer(client: VisionClient, job: VisionJob) -> Features:
    """Send one job and wait for its whole answer, its parts joined into one tensor."""
    parts: list[Features] = []
    try:
        async for part in client.encode_parts(job):
            parts.append(part)
    except BaseException:
        for part in parts:
            part.release()
        raise
    if len(parts) == 1:
        return parts[0]
    tensor = torch.cat([p.tensor for p in parts])
    for part in parts:
        part.release()
    return Features(replace(parts[-1].header, row_offset=0, shape=tuple(tensor.shape),
                            payload_bytes=tensor.numel() * tensor.element_size()),
                    tensor, received_unix_s=parts[-1].received_unix_s)


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
    from language_server.media_layout import new_job_id

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
        whole = await joined_answer(client, job())
        joined = (whole.header.row_offset, whole.header.shape, whole.tensor.clone())
        whole.release()
        return got, joined

    try:
        outcome = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        outcome = exc
    finally:
        pending = dict(client.inbox._pending)
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
