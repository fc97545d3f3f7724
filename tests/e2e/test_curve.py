"""`transport.auth: curve` end to end: with the keys the launcher makes, DvD computes what
transformers computes, and a process without them cannot get a job encoded by the vision server."""

from __future__ import annotations

import pytest

from pipeline.client import sampling
from pipeline.transport import create_backend
from pipeline.wire import VisionJob, decode_header
from pipeline.wire.channels import PushChannel
from pipeline.wire.curve import load_keys
from tests.conftest import photo_bytes
from tests.e2e.test_equivalence import CASES, MAX_NEW_TOKENS
from tests.reference import to_messages

TIMEOUT_S = 60.0
REFUSED_S = 2.0


@pytest.fixture(scope="module")
def curve_deployment(start_deployment):
    return start_deployment({"vision.dtype": "float32", "language.dtype": "float32", "transport.auth": "curve",
                             "transport.backend": "shm"}, name="curve")


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers_generate_over_curve(case, curve_deployment, client_for, reference_fp32):
    conversation = CASES[case]
    result = client_for(curve_deployment).generate(
        to_messages(conversation), sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    )
    assert list(result.token_ids) == reference_fp32.generate(conversation, MAX_NEW_TOKENS)


def test_a_peer_without_the_keys_cannot_get_a_job_encoded(curve_deployment):
    config = curve_deployment.config
    assert config.transport.curve_key_file and curve_deployment.made_key_file is not None
    keys = load_keys(config.transport.curve_key_file)
    job_address = f"tcp://{config.vision.host}:{config.vision.job_port}"
    inbox = create_backend(config.transport).receiver("127.0.0.1", 0)  # where answers come, with the keys
    stranger = PushChannel(job_address, send_timeout_s=REFUSED_S)
    member = PushChannel(job_address, send_timeout_s=TIMEOUT_S, keys=keys)
    job = VisionJob(job_id="probe", request_id="r", kind="image", data=photo_bytes("coffee"), reply_to=inbox.address)
    try:
        assert not stranger.send([job.encode()])  # the handshake never completes
        assert inbox.recv(REFUSED_S) is None
        assert member.send([job.encode()])  # the same job from a process holding the key file
        frame = inbox.recv(TIMEOUT_S)
        assert frame is not None and decode_header(frame.header).job_id == "probe"
        frame.release()
    finally:
        for closable in (stranger, member, inbox):
            closable.close()
