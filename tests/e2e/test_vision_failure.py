"""A vision server killed with a job in flight is noticed at once (its job connection drops): the
job goes to another replica, or fails UNAVAILABLE naming the server, long before any timeout;
the language server goes on serving text."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from pipeline.client import image, message, sampling
from proto.dvd.v1 import generate_pb2 as pb
from tests.conftest import photo_bytes
from tests.e2e.metrics import language_metric
from tests.waiting import wait_until

DETECTION_BOUND_S = 3.0
REPLICA_TIMEOUT_S = 20.0  # the slow way a job would otherwise move on: far above the bound
PARAMS = dict(max_new_tokens=4)
SETTINGS = {"vision.dtype": "float32", "language.dtype": "float32", "vision.feature_cache_bytes": 0,
            "vision.replica_timeout_s": REPLICA_TIMEOUT_S, "language.vision_timeout_s": 60.0}


def _ask(name: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[message("user", image(photo_bytes(name)), "What is this?")],
                              sampling=sampling(**PARAMS))


def _vision_jobs_inside(deployment) -> float:
    return language_metric(deployment, 'dvd_stage_occupancy{stage="vision"}', default=0.0)


def _process(deployment, name: str):
    return next(s.process for s in deployment.servers if s.name == name)


def _kill_with_a_job_inside(deployment, client, name: str, request: pb.GenerateRequest):
    """Freeze vision server `name`, send `request`, and once its job is in the vision stage, kill
    the server. Returns the request's future and the time of the kill."""
    victim = _process(deployment, name)
    victim.send_signal(signal.SIGSTOP)
    future = client.stub.GenerateUnary.future(request, timeout=120)
    assert wait_until(lambda: _vision_jobs_inside(deployment) >= 1, timeout_s=30)
    victim.kill()
    killed = time.monotonic()
    victim.wait(30)
    return future, killed


def test_one_replica_killed_fails_its_job_at_once_and_text_goes_on(start_deployment, client_for):
    deployment = start_deployment(SETTINGS, name="vision-failure-one")
    client = client_for(deployment)
    assert client.generate(_ask("coffee").messages, sampling(**PARAMS)).token_ids  # the path works
    vc = deployment.config.vision
    future, killed = _kill_with_a_job_inside(deployment, client, "vision-0", _ask("chelsea"))
    with pytest.raises(grpc.RpcError) as failure:
        future.result()
    assert time.monotonic() - killed < DETECTION_BOUND_S
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"{vc.host}:{vc.job_port}" in failure.value.details()
    text = client.generate([message("user", "Hello")], sampling(**PARAMS))
    assert len(text.token_ids) == PARAMS["max_new_tokens"]
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:  # no vision server: refused quickly, not after a timeout
        client.generate(_ask("rocket").messages, sampling(**PARAMS))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < DETECTION_BOUND_S


def test_a_job_on_a_killed_replica_is_answered_by_the_other(start_deployment, client_for):
    deployment = start_deployment({**SETTINGS, "vision.replicas": 2}, name="vision-failure-two")
    client = client_for(deployment)
    expected = list(client.generate(_ask("astronaut").messages, sampling(**PARAMS)).token_ids)
    future, killed = _kill_with_a_job_inside(deployment, client, "vision-0", _ask("astronaut"))
    assert list(future.result().token_ids) == expected
    assert time.monotonic() - killed < DETECTION_BOUND_S + 5.0  # detection, then one encode on vision-1
    assert time.monotonic() - killed < REPLICA_TIMEOUT_S
    again = client.generate(_ask("astronaut").messages, sampling(**PARAMS))
    assert list(again.token_ids) == expected  # new jobs skip the dead replica
