"""The batching engine through real servers: concurrent gRPC requests, chunked and preempted
inside the engine, equal transformers' `generate`; clients that go away give their KV blocks back.
The tests of requests (not of the builtin pool's own mechanics) run on both language engines."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from pipeline.client import sampling
from proto.dvd.v1 import generate_pb2 as pb
from tests.conftest import ENGINES, photo_bytes
from tests.e2e.metrics import language_metric
from tests.reference import Reference, img, text, to_messages

MAX_NEW_TOKENS = 12
WAIT_S = 60.0
LONG = dict(max_new_tokens=4000, ignore_eos=True)  # far more decode steps than the test waits for


@pytest.fixture(scope="module")
def tight(start_deployment):
    """float32 servers whose engine must chunk (96-token steps) and preempt (2560-token KV pool)."""
    return start_deployment(
        {
            "vision.dtype": "float32",
            "language.dtype": "float32",
            "language.num_kv_blocks": 160,
            "language.block_size": 16,
            "language.max_model_len": 2560,
            "language.max_num_batched_tokens": 96,
        },
        name="tight_engine",
    )


@pytest.fixture(scope="module", params=ENGINES)
def served(request):
    """`tight` on the builtin engine, then the shared deployment on vLLM's engine."""
    return request.getfixturevalue("tight" if request.param == "builtin" else "vllm_deployment")


@pytest.fixture
def kv_pool_drains():
    """After the test, the KV pool of every deployment it named is empty again."""
    deployments = []
    yield deployments.append
    for deployment in deployments:
        assert wait_for_kv_blocks(deployment, lambda used: used == 0) == 0


@pytest.fixture
def drained_tight(tight, kv_pool_drains):
    kv_pool_drains(tight)
    return tight


@pytest.fixture
def drained(served, kv_pool_drains):
    kv_pool_drains(served)
    return served


def metric(deployment, series: str) -> float:
    """One series' value from the language server's /metrics."""
    return language_metric(deployment, series)


def kv_blocks_used(deployment) -> float:
    return metric(deployment, "dvd_kv_cache_used_blocks")


def wait_for_kv_blocks(deployment, condition, timeout_s: float = WAIT_S) -> float:
    """Poll the KV gauge until `condition(value)` holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = kv_blocks_used(deployment)
        if condition(used):
            return used
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks used stayed at {used} for {timeout_s} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tiny_dirs) -> Reference:
    return Reference(tiny_dirs["hf"], torch.float32)


def _conversations() -> list[list[dict]]:
    coffee, astronaut, chelsea, rocket = (photo_bytes(n) for n in ("coffee", "astronaut", "chelsea", "rocket"))
    user = lambda *parts: {"role": "user", "content": list(parts)}  # noqa: E731
    return [
        [user(img(coffee), text("What is in this image?"))],  # 1807 prompt tokens
        [user(img(astronaut), img(chelsea), text("Compare the two images."))],
        [user(text("Tell me a short story about a lighthouse."))],
        [
            user(img(rocket), text("Describe the picture.")),
            {"role": "assistant", "content": [text("A rocket on a launch pad.")]},
            user(text("What colour is it?")),
        ],
        [user(img(astronaut), text("Who is this?"))],
        [user(text("Name three colours."))],
    ]


def test_concurrent_requests_equal_transformers_generate(drained, client_for, reference):
    conversations = _conversations()
    client = client_for(drained)
    params = sampling(max_new_tokens=MAX_NEW_TOKENS)
    with ThreadPoolExecutor(len(conversations)) as pool:
        futures = [pool.submit(client.generate, to_messages(c), params) for c in conversations]
        results = [f.result(timeout=WAIT_S * 3) for f in futures]
    for conversation, result in zip(conversations, results):
        assert list(result.token_ids) == reference.generate(conversation, MAX_NEW_TOKENS)


def test_client_that_disconnects_mid_stream_frees_its_blocks(drained, client_for):
    client = client_for(drained)
    conversation = _conversations()[4]
    stream = client.stream(to_messages(conversation), sampling(**LONG))
    deltas = [next(stream) for _ in range(3)]
    assert all(d.HasField("delta") for d in deltas)
    assert kv_blocks_used(drained) > 0  # the request holds blocks while it streams
    stream.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    wait_for_kv_blocks(drained, lambda used: used == 0)


def test_deadline_mid_generation_frees_blocks_and_others_finish(drained, client_for, reference):
    client = client_for(drained)
    # A short prompt, so that max_model_len leaves room for ~2500 tokens: far more than 3 s of decode.
    doomed = pb.GenerateRequest(messages=to_messages(_conversations()[5]), sampling=sampling(**LONG))
    survivor = _conversations()[2]
    with ThreadPoolExecutor(2) as pool:
        cut = pool.submit(client.stub.GenerateUnary, doomed, timeout=3.0)
        kept = pool.submit(client.generate, to_messages(survivor), sampling(max_new_tokens=MAX_NEW_TOKENS))
        with pytest.raises(grpc.RpcError) as info:
            cut.result(timeout=WAIT_S)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert list(kept.result(timeout=WAIT_S).token_ids) == reference.generate(survivor, MAX_NEW_TOKENS)
    wait_for_kv_blocks(drained, lambda used: used == 0)


def test_kv_metrics_describe_the_configured_pool(drained_tight, client_for):
    client_for(drained_tight).generate(to_messages(_conversations()[5]), sampling(max_new_tokens=2))
    assert metric(drained_tight, "dvd_kv_cache_blocks") == 160
    assert metric(drained_tight, "dvd_kv_cache_usage") == 0.0


def test_a_pool_too_small_for_two_requests_preempts_and_counts_it(drained_tight, client_for):
    """A long-running image request holds ~1.8k of the 2560 KV slots; a 900-token text prompt
    arriving beside it cannot be prefilled without preempting."""
    client = client_for(drained_tight)
    before = metric(drained_tight, "dvd_engine_preemptions_total")
    first = client.stream(to_messages(_conversations()[0]), sampling(**LONG))
    second = None
    try:
        assert all(next(first).HasField("delta") for _ in range(3))  # running and decoding
        second = client.stream(to_messages([{"role": "user", "content": [text(" hello" * 900)]}]), sampling(**LONG))
        deadline = time.monotonic() + WAIT_S
        while metric(drained_tight, "dvd_engine_preemptions_total") == before:
            assert time.monotonic() < deadline, "no preemption was counted"
            time.sleep(0.05)
    finally:
        for stream in (first, second):
            if stream is not None:
                stream.cancel()
    wait_for_kv_blocks(drained_tight, lambda used: used == 0)
