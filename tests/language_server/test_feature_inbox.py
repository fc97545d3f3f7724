"""The feature receiver thread survives any failure while handling a frame, and fails the job;
its socket refuses frames larger than any answer."""

from __future__ import annotations

import asyncio

import pytest
import torch

import language_server.feature_inbox as feature_inbox
from language_server.feature_inbox import PendingJob
from language_server.vision_client import VisionClient
from pipeline.config import config_from_dict
from pipeline.errors import InternalError
from pipeline.transport import create_backend
from pipeline.wire import FeatureHeader, encode_features
from tests.conftest import port_overrides

HIDDEN = 16
WAIT_S = 30.0


def _config(**language):
    raw: dict = {"language": dict(language), "vision": {}}
    for dotted, value in port_overrides().items():
        section, key = dotted.split(".")
        raw[section][key] = value
    raw["transport"] = {"backend": "tcp"}
    return config_from_dict(raw)


def test_an_unexpected_error_fails_that_job_and_the_receiver_goes_on(monkeypatch):
    config = _config()
    client = VisionClient(config, hidden_size=HIDDEN)
    sender = create_backend(config.transport).sender()
    real_decode = feature_inbox.decode_features
    calls: list[str] = []

    def decode_failing_first(header, *args, **kwargs):
        calls.append(header.job_id)
        if len(calls) == 1:
            raise RuntimeError("unexpected bug")
        return real_decode(header, *args, **kwargs)

    monkeypatch.setattr(feature_inbox, "decode_features", decode_failing_first)

    async def answer(job_id: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        pending = PendingJob(loop.create_future(), loop)
        client.inbox.expect(job_id, pending)
        header, payload = encode_features(FeatureHeader(job_id, "r", tile_tokens=(4,)), torch.zeros(4, HIDDEN))
        await asyncio.to_thread(sender.send, client.inbox.address, header, payload)
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
        limit = client.inbox.receiver._socket.getsockopt(zmq.MAXMSGSIZE)
    finally:
        client.close()
    largest = max_feature_bytes(config.images.max_tiles_per_request, HIDDEN)
    assert largest < limit <= largest + feature_inbox.HEADER_BYTES


@pytest.mark.parametrize("feature_host, expected_host", [("", "127.0.0.1"), ("lang-1.internal", "lang-1.internal"),
                                                         ("fd00::5", "[fd00::5]")])
def test_jobs_name_the_feature_host_with_the_bound_port(feature_host, expected_host):
    config = _config(host="0.0.0.0" if feature_host else "127.0.0.1", feature_host=feature_host)
    client = VisionClient(config, hidden_size=HIDDEN)
    try:
        assert client.inbox.address == f"tcp://{expected_host}:{config.language.feature_port}"
    finally:
        client.close()
