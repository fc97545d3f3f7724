"""Every transport through two real server processes: greedy tokens equal transformers', and
no shared-memory payload outlives its request (every pooled segment is released by the receiver)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.client import sampling
from pipeline.transport.shm_segments import FREE, PREFIX, SHM_DIR, Segment
from tests.conftest import TEST_DEVICE, photo_bytes
from tests.reference import Reference, img, text, to_messages
from tests.waiting import wait_until

MAX_NEW_TOKENS = 12
SHM_IDLE_S = 600.0  # released segments stay pooled for the whole test, however slowly it runs


def _available(name: str) -> str:
    if name == "nixl":
        pytest.importorskip("nixl._api", reason="the optional 'rdma' extra (nixl) is not installed")
    return name


@pytest.fixture(scope="module", params=["tcp", "shm", "nixl"])
def deployment(request, start_deployment):
    name = _available(request.param)
    if name == "tcp":
        # The session's float32 deployment is exactly this one (tcp is the default backend).
        servers = request.getfixturevalue("fp32_deployment")
        assert servers.config.transport.backend == "tcp"
        yield name, servers
        return
    overrides = {"transport.backend": name, "vision.dtype": "float32", "language.dtype": "float32"}
    if name == "shm":
        overrides["transport.pool_idle_s"] = SHM_IDLE_S
    servers = start_deployment(overrides, name=f"transport-{name}")
    yield name, servers
    servers.stop()  # before the next backend's deployment starts


@pytest.fixture(scope="module")
def reference(tiny_dirs) -> Reference:
    return Reference(tiny_dirs["hf"], torch.float32, TEST_DEVICE)


def conversations() -> dict[str, list[dict]]:
    coffee, astronaut, chelsea = (photo_bytes(n) for n in ("coffee", "astronaut", "chelsea"))
    return {
        "single_image": [{"role": "user", "content": [img(coffee), text("What is in this image?")]}],
        "two_images": [{"role": "user", "content": [img(astronaut), img(chelsea), text("Compare the two images.")]}],
    }


CASES = conversations()
_EXPECTED: dict[str, list[int]] = {}


def expected_tokens(reference: Reference, case: str) -> list[int]:
    if case not in _EXPECTED:
        _EXPECTED[case] = reference.generate(CASES[case], MAX_NEW_TOKENS)
    return _EXPECTED[case]


def segments_of(pid: int) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}{pid}-*"))


def segment_states(pids: list[int]) -> list[int]:
    """The control-block state of every segment the vision servers hold."""
    states = []
    for name in (n for pid in pids for n in segments_of(pid)):
        try:
            segment = Segment.open(name)
        except FileNotFoundError:
            continue
        try:
            states.append(segment.state)
        finally:
            segment.close()
    return states


def vision_pids(deployment) -> list[int]:
    return [s.process.pid for s in deployment.servers if s.name.startswith("vision")]


def test_greedy_tokens_equal_transformers_and_no_segment_outlives_the_requests(deployment, client_for, reference):
    name, servers = deployment
    client = client_for(servers)
    pids = vision_pids(servers)
    assert pids
    for case in CASES:
        messages = to_messages(CASES[case])
        events = client.stream(messages, sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0))
        first = next(events)
        rest = list(events)
        tokens = [t for e in [first, *rest] if e.HasField("delta") for t in e.delta.token_ids]
        assert tokens == expected_tokens(reference, case), f"{name}: {case}"
        assert rest[-1].HasField("result") and list(rest[-1].result.token_ids) == tokens
        if name == "shm":
            assert segment_states(pids), "the features did not travel through shared memory"
            # the receiver hands every payload back once the request is done with it
            assert wait_until(lambda: set(segment_states(pids)) == {FREE}, 30), segment_states(pids)
        else:
            assert [s for pid in pids for s in segments_of(pid)] == []
    if name == "nixl":
        for pid in pids:
            assert "nixl" in Path(f"/proc/{pid}/maps").read_text(), "the vision server did not load NIXL"
