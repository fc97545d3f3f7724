"""A full server answers RESOURCE_EXHAUSTED and keeps serving the requests it admitted."""

from __future__ import annotations

import grpc
import pytest

from pipeline.client import message, sampling


@pytest.fixture(scope="module")
def one_slot_deployment(start_deployment):
    return start_deployment(
        {"vision.dtype": "float32", "language.dtype": "float32", "language.max_pending_requests": 1},
        name="one-slot",
    )


def test_full_admission_is_resource_exhausted(one_slot_deployment, client_for):
    busy = client_for(one_slot_deployment)
    stream = busy.stream([message("user", "Tell me a long story.")], sampling(max_new_tokens=64, ignore_eos=True))
    first = next(stream)
    assert first.HasField("delta")  # the first request is admitted and generating

    with pytest.raises(grpc.RpcError) as info:
        client_for(one_slot_deployment).generate([message("user", "hi")], sampling(max_new_tokens=2))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "admission is full" in info.value.details()

    rest = list(stream)
    assert rest[-1].HasField("result") and len(rest[-1].result.token_ids) == 64
    after = client_for(one_slot_deployment).generate([message("user", "hi")], sampling(max_new_tokens=2))
    assert len(after.token_ids) == 2
