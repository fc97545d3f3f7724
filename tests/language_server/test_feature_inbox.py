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
from pipeline.wire import FeatureHeader, WireError, decode_features, decode_header, encode_features
from proto.dvd.v1 import vision_pb2 as pb
from tests.conftest import port_overrides

HIDDEN = 16
WAIT_S = 30.0


def _config(transport: dict | None = None, **language):
    raw: dict = {"language": dict(language), "vision": {}}
    for dotted, value in port_overrides().items():
        section, key = dotted.split(".")
        raw[section][key] = value
    raw["transport"] = {"backend": "tcp", **(transport or {})}
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
def test_jobs_name_the_feature_host_with_the_bound_port(feature_host, expected_host, tmp_path):
    from pipeline.wire.curve import generate_keys

    # a wildcard bind opens the feature port beyond this host: only with CurveZMQ
    transport = {"auth": "curve", "curve_key_file": str(generate_keys(tmp_path))} if feature_host else None
    config = _config(transport, host="0.0.0.0" if feature_host else "127.0.0.1", feature_host=feature_host)
    client = VisionClient(config, hidden_size=HIDDEN)
    try:
        assert client.inbox.address == f"tcp://{expected_host}:{config.language.feature_port}"
    finally:
        client.close()


def _answers(frames: list[tuple[str, bytes, memoryview]], wait_s: float = WAIT_S) -> list:
    """Send (job_id, header, payload) frames to a fresh inbox; each job's answer or error, in order."""
    config = _config()
    client = VisionClient(config, hidden_size=HIDDEN)
    sender = create_backend(config.transport).sender()

    async def answer(job_id: str, header: bytes, payload: memoryview):
        loop = asyncio.get_running_loop()
        pending = PendingJob(loop.create_future(), loop)
        client.inbox.expect(job_id, pending)
        await asyncio.to_thread(sender.send, client.inbox.address, header, payload)
        try:
            return await asyncio.wait_for(pending.future, wait_s)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            return exc

    async def main():
        return [await answer(*frame) for frame in frames]

    try:
        return asyncio.run(main())
    finally:
        sender.close()
        client.close()


def test_a_header_naming_its_job_without_a_status_fails_that_job_at_once():
    header = pb.FeatureHeader(job_id="nostatus", request_id="r", server_id="vision-7@10.0.0.7:5601")
    good = encode_features(FeatureHeader("good", "r", tile_tokens=(4,)), torch.zeros(4, HIDDEN))
    failed, answered = _answers([("nostatus", header.SerializeToString(), memoryview(b"")), ("good", *good)],
                                wait_s=10.0)  # well under a request's timeout
    assert isinstance(failed, InternalError), failed
    assert "has no status" in str(failed) and "vision-7@10.0.0.7:5601" in str(failed)
    assert answered.tensor.shape == (4, HIDDEN)
    answered.release()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_features_fail_their_job_naming_the_vision_server(value, dtype):
    rows = torch.zeros(4, HIDDEN, dtype=dtype)
    rows[2, 5] = value
    bad = encode_features(FeatureHeader("bad", "r", tile_tokens=(4,), server_id="vision-3@h:1"), rows)
    good = encode_features(FeatureHeader("good", "r", tile_tokens=(4,)), torch.ones(4, HIDDEN, dtype=dtype))
    failed, answered = _answers([("bad", *bad), ("good", *good)])
    assert isinstance(failed, InternalError), failed
    assert "NaN or infinite" in str(failed) and "vision-3@h:1" in str(failed)
    assert answered.tensor.shape == (4, HIDDEN)
    answered.release()


def test_decode_features_refuses_non_finite_rows():
    rows = torch.zeros(4, HIDDEN)
    rows[0, 0] = float("nan")
    header, payload = encode_features(FeatureHeader("j", "r", tile_tokens=(4,)), rows)
    with pytest.raises(WireError, match="NaN or infinite"):
        decode_features(decode_header(header), payload, hidden_size=HIDDEN)
