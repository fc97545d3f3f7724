"""Several vision servers: load spreads by outstanding tiles, one vision server serves two language
servers, and a hung or dead replica is bypassed. Destructive tests come last in this file."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.client import DvDClient, image, message, sampling
from pipeline.entrypoints.health import wait_healthy
from proto.dvd.v1 import generate_pb2 as pb
from tests.conftest import photo_bytes
from tests.e2e.metrics import scrape

REPLICA_TIMEOUT_S = 5.0
PHOTOS = ("coffee", "chelsea", "rocket", "astronaut", "camera", "coins")
PARAMS = dict(max_new_tokens=4)


@pytest.fixture(scope="module")
def replicated(start_deployment):
    return start_deployment(
        {
            "vision.replicas": 2,
            "vision.replica_timeout_s": REPLICA_TIMEOUT_S,
            "vision.feature_cache_bytes": 0,
            "vision.dtype": "float32",
            "language.dtype": "float32",
        },
        name="replicas",
    )


@pytest.fixture(scope="module")
def expected(replicated) -> dict[str, list[int]]:
    """Each photo's answer, asked one at a time while both replicas are healthy."""
    with DvDClient(replicated.address, timeout_s=120) as client:
        return {name: list(client.generate(_ask(name), sampling(**PARAMS)).token_ids) for name in PHOTOS}


def _ask(name: str) -> list[pb.Message]:
    return [message("user", image(photo_bytes(name)), "What is this?")]


def _concurrently(client, names) -> dict[str, list[int]]:
    futures = {
        name: client.stub.GenerateUnary.future(
            pb.GenerateRequest(messages=_ask(name), sampling=sampling(**PARAMS)), timeout=120
        )
        for name in names
    }
    return {name: list(future.result().token_ids) for name, future in futures.items()}


def _ok_jobs(deployment, replica: int) -> float:
    vc = deployment.config.vision
    return scrape(vc.host, vc.metrics_port + replica, 'dvd_vision_jobs_total{status="ok"}', default=0.0)


def _process(deployment, name: str):
    return next(s.process for s in deployment.servers if s.name == name)


def test_concurrent_jobs_spread_over_both_replicas(replicated, client_for, expected):
    before = [_ok_jobs(replicated, i) for i in (0, 1)]
    answers = _concurrently(client_for(replicated), PHOTOS)
    assert answers == expected
    served = [_ok_jobs(replicated, i) - before[i] for i in (0, 1)]
    assert sum(served) == len(PHOTOS) and min(served) >= 1


def test_one_vision_server_serves_two_language_servers(replicated, start_deployment, client_for, expected):
    vc = replicated.config.vision
    second = start_deployment(
        {"language.vision_servers": [f"{vc.host}:{vc.job_port}"], "vision.dtype": "float32", "language.dtype": "float32"},
        name="second-language",
    )
    assert [s.name for s in second.servers] == ["language"]  # it brought no vision server of its own
    before = _ok_jobs(replicated, 0)
    first_client, second_client = client_for(replicated), client_for(second)
    futures = [
        (client.stub.GenerateUnary.future(pb.GenerateRequest(messages=_ask(n), sampling=sampling(**PARAMS)), timeout=120), n)
        for client in (first_client, second_client)
        for n in ("coffee", "chelsea")
    ]
    for future, name in futures:
        assert list(future.result().token_ids) == expected[name]
    assert _ok_jobs(replicated, 0) - before >= 2  # at least the second language server's jobs


def test_a_hung_replica_is_bypassed_after_the_replica_timeout(replicated, client_for, expected):
    hung = _process(replicated, "vision-0")
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        client = client_for(replicated)
        started = time.monotonic()
        first = list(client.generate(_ask("astronaut"), sampling(**PARAMS)).token_ids)
        assert time.monotonic() - started >= REPLICA_TIMEOUT_S  # it waited for vision-0, then went elsewhere
        assert first == expected["astronaut"]
        assert _concurrently(client, ("coffee", "rocket", "camera")) == {n: expected[n] for n in ("coffee", "rocket", "camera")}
    finally:
        os.kill(hung.pid, signal.SIGCONT)
    vc = replicated.config.vision
    wait_healthy(f"{vc.host}:{vc.grpc_port}", 60)


def test_a_dead_replica_is_bypassed(replicated, client_for, expected):
    dead = _process(replicated, "vision-1")
    dead.kill()
    dead.wait(30)
    answers = _concurrently(client_for(replicated), PHOTOS)
    assert answers == expected
    assert replicated.failed() is not None and replicated.failed().name == "vision-1"
