"""CurveZMQ on the internal sockets: a peer with the deployment's keys gets through; one without
them, or with another deployment's, can neither push a job nor deliver features."""

from __future__ import annotations

import zmq

import pytest

from pipeline.transport import PeerTimeout
from pipeline.transport.tcp import TcpReceiver, TcpSender
from pipeline.wire.channels import PullChannel, PushChannel
from pipeline.wire.curve import CurveError, deployment_keys, generate_keys, load_keys

TIMEOUT_S = 10.0
REFUSED_S = 1.5  # how long an unauthenticated peer is given to get through


@pytest.fixture
def keys(tmp_path):
    return load_keys(str(generate_keys(tmp_path / "deployment")))


@pytest.fixture
def other_keys(tmp_path):
    return load_keys(str(generate_keys(tmp_path / "another")))


def test_the_key_file_is_private_and_required(tmp_path):
    path = generate_keys(tmp_path / "keys")
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert deployment_keys("none", "") is None
    with pytest.raises(CurveError, match="curve_key_file is empty"):
        deployment_keys("curve", "")
    with pytest.raises(CurveError, match="holds no secret key"):
        load_keys(str(path.with_suffix(".key")))


def test_only_a_peer_with_the_deployments_keys_can_push_a_job(keys, other_keys):
    jobs = PullChannel("tcp://127.0.0.1:0", keys=keys)
    strangers = [PushChannel(jobs.address, send_timeout_s=REFUSED_S),
                 PushChannel(jobs.address, send_timeout_s=REFUSED_S, keys=other_keys)]
    member = PushChannel(jobs.address, send_timeout_s=TIMEOUT_S, keys=keys)
    try:
        assert [stranger.send([b"job"]) for stranger in strangers] == [False, False]
        assert jobs.recv(0.2) is None
        assert member.send([b"job"])
        assert jobs.recv(TIMEOUT_S) == [b"job"]
    finally:
        for channel in (*strangers, member, jobs):
            channel.close()


def test_only_a_peer_with_the_deployments_keys_can_deliver_features(keys, other_keys):
    context = zmq.Context.instance()
    receiver = TcpReceiver(context, "127.0.0.1", 0, 16, keys=keys)
    strangers = [TcpSender(context, REFUSED_S, 16), TcpSender(context, REFUSED_S, 16, keys=other_keys)]
    member = TcpSender(context, TIMEOUT_S, 16, keys=keys)
    try:
        for stranger in strangers:
            with pytest.raises(PeerTimeout):
                stranger.send(receiver.address, b"header", b"payload")
        assert receiver.recv(0.2) is None
        member.send(receiver.address, b"header", b"payload")
        frame = receiver.recv(TIMEOUT_S)
        assert frame is not None and frame.header == b"header" and bytes(frame.payload) == b"payload"
    finally:
        for sender in (*strangers, member):
            sender.close()
        receiver.close()
