"""A full server answers RESOURCE_EXHAUSTED and keeps serving the requests it admitted."""

from __future__ import annotations

import grpc
import pytest

from pipeline.client import message, sampling
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def one_slot_deployment(start_deployment):
    return start_deployment(
        {"vision.dtype": "float32", "language.dtype": "float32", "language.max_pending_requests": 1},
        name="one-slot",
    )


def _admitted(client) -> bool:
    """Whether a short request gets in (False while the one slot is taken)."""
    try:
        return len(client.generate([message("user", "hi")], sampling(max_new_tokens=2)).token_ids) == 2
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False


def test_full_admission_is_resource_exhausted(one_slot_deployment, client_for):
    busy = client_for(one_slot_deployment)
    # far more tokens than the test waits for: the slot stays taken until the stream is cancelled
    stream = busy.stream([message("user", "Tell me a long story.")], sampling(max_new_tokens=4000, ignore_eos=True))
    first = next(stream)
    assert first.HasField("delta")  # the first request is admitted and generating

    with pytest.raises(grpc.RpcError) as info:
        client_for(one_slot_deployment).generate([message("user", "hi")], sampling(max_new_tokens=2))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "admission is full" in info.value.details()

    more = [next(stream) for _ in range(3)]  # the admitted request goes on streaming
    assert all(event.HasField("delta") for event in more)
    stream.cancel()
    probe = client_for(one_slot_deployment)
    assert wait_until(lambda: _admitted(probe), timeout_s=60)  # the cancelled request gave its slot back
