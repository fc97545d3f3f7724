"""language.engine: vllm through the two real server processes: the same greedy tokens as the builtin
engine and as transformers, for every kind of prompt and ViR (both checkpoint formats of every family:
test_families.py), also with vLLM's AVX2 kernels; and no process of the language server holds a vision
tensor."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from benchmarks.server_cpu import descendants
from pipeline.model.checkpoint import open_model
from pipeline.client import message, sampling, video
from pipeline.model.tiny_model import tiny_model_dir
from proto.dvd.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import FP32, VLLM_ENGINE, photo_bytes, requires_vllm
from tests.e2e.test_equivalence import CASES
from tests.e2e.test_vision_video import QUESTION, SEGMENTS, reference_tokens
from tests.reference import Reference, img, text, to_messages
from tests.vision_server.helpers import moving_frames, mp4_bytes
from tests.vision_server.vir_reference import ReleasedFlash

pytestmark = requires_vllm
MAX_NEW_TOKENS = 12
NO_AVX512 = Path(__file__).parent / "no_avx512"  # its sitecustomize.py hides AVX-512 from vLLM's kernel choice
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
VISION_PREFIXES = ("vision_model.", "mlp1.", "mlp2.", "pooling_before_gating.", "gating.", "model.vision_tower.",
                   "model.multi_modal_projector.")


@pytest.fixture(scope="module")
def reference(tiny_dirs) -> Reference:
    return Reference(tiny_dirs["hf"], torch.float32)


@pytest.fixture(scope="module")
def flash_vllm(start_deployment):
    return start_deployment({**VLLM_ENGINE, **FP32, "model.path": str(tiny_model_dir("flash"))}, name="vllm_flash")


@pytest.fixture(scope="module")
def avx2_vllm(start_deployment):
    """vllm_deployment as on an x86-64 CPU without AVX-512: every server process is told there is
    none, and torch, oneDNN and MKL are held to AVX2."""
    python_path = os.pathsep.join(filter(None, [str(NO_AVX512), os.environ.get("PYTHONPATH")]))
    return start_deployment({**VLLM_ENGINE, **FP32}, name="vllm_avx2", env={**AVX2_ONLY, "PYTHONPATH": python_path})


def _generate(client, conversation, max_new_tokens: int = MAX_NEW_TOKENS):
    return client.generate(to_messages(conversation), sampling(max_new_tokens=max_new_tokens, temperature=0.0))


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_builtin_and_transformers(case, vllm_deployment, fp32_deployment, client_for, reference):
    conversation = CASES[case]
    expected = reference.generate(conversation, MAX_NEW_TOKENS)
    on_vllm = _generate(client_for(vllm_deployment), conversation)
    on_builtin = _generate(client_for(fp32_deployment), conversation)
    assert list(on_vllm.token_ids) == expected == list(on_builtin.token_ids)
    assert on_vllm.usage.prompt_tokens == on_builtin.usage.prompt_tokens
    assert on_vllm.text == on_builtin.text
    assert on_vllm.finish_reason == on_builtin.finish_reason


def test_video_equals_transformers(vllm_deployment, client_for, reference):
    clip = mp4_bytes(moving_frames(40), fps=24)
    expected, prompt_tokens = reference_tokens(reference, clip)
    result = client_for(vllm_deployment).generate(
        [message("user", video(clip, num_segments=SEGMENTS), QUESTION)], sampling(max_new_tokens=MAX_NEW_TOKENS)
    )
    assert list(result.token_ids) == expected
    assert result.usage.prompt_tokens == prompt_tokens


def test_flash_checkpoint_under_vir_routing(flash_vllm, client_for, tiny_dirs):
    released = ReleasedFlash(Reference(tiny_dirs["hf"], torch.float32), tiny_model_dir("flash"))
    client = client_for(flash_vllm)
    for case in ("single_image", "two_images"):
        expected, prompt_tokens, flags = released.generate(CASES[case], MAX_NEW_TOKENS)
        assert 0 < sum(flags) < len(flags)  # some tiles kept at 256 tokens, some compressed to 64
        result = _generate(client, CASES[case])
        assert list(result.token_ids) == expected, case
        assert result.usage.image_tokens == sum(64 if f else 256 for f in flags)


def test_twelve_mixed_requests_at_once(vllm_deployment, client_for, reference):
    photos = [photo_bytes(n) for n in ("coffee", "astronaut", "chelsea", "rocket")]
    conversations = [*CASES.values()]
    for i, photo in enumerate(photos):
        conversations.append([{"role": "user", "content": [img(photo), text(f"Question {i}: what is here?")]}])
        conversations.append([{"role": "user", "content": [text(f"Say something about the number {i}.")]}])
    assert len(conversations) == 12
    client = client_for(vllm_deployment)
    with ThreadPoolExecutor(len(conversations)) as pool:
        results = list(pool.map(lambda c: _generate(client, c), conversations, timeout=600))
    for conversation, result in zip(conversations, results):
        assert list(result.token_ids) == reference.generate(conversation, MAX_NEW_TOKENS)


def _vllm_kernel_builds(pid: int) -> set[str]:
    """The builds of vLLM's kernel library (_C, _C_AVX512, _C_AVX2) that a process tree has mapped."""
    builds: set[str] = set()
    for process in (pid, *descendants(pid)):
        try:
            builds |= set(re.findall(r"/vllm/(_C\w*)\.abi3\.so", Path(f"/proc/{process}/maps").read_text()))
        except OSError:  # gone meanwhile
            continue
    return builds


def test_on_a_cpu_without_avx512_vllm_runs_its_avx2_kernels_with_the_same_tokens(avx2_vllm, client_for, reference):
    language = next(server for server in avx2_vllm.servers if server.name == "language")
    assert _vllm_kernel_builds(language.process.pid) == {"_C_AVX2"}
    client = client_for(avx2_vllm)
    for case, conversation in CASES.items():
        assert list(_generate(client, conversation).token_ids) == reference.generate(conversation, MAX_NEW_TOKENS), case


def _info(address: str) -> admin_pb2.ServerInfo:
    with grpc.insecure_channel(address) as channel:
        return admin_pb2_grpc.AdminStub(channel).GetServerInfo(admin_pb2.GetServerInfoRequest(), timeout=30)


@pytest.mark.parametrize("which", ["hf", "flash"])
def test_no_language_process_holds_a_vision_tensor(which, request):
    """What every vLLM worker holds (reported through the language server's Admin service) is the
    language model alone: no vision, projector or ViR tensor, and exactly the LLM's bytes."""
    deployment = request.getfixturevalue("vllm_deployment" if which == "hf" else "flash_vllm")
    info = _info(deployment.address)
    assert info.role == "language" and info.loaded_tensors
    assert all(name.startswith("language_model.") for name in info.loaded_tensors), info.loaded_tensors
    assert not [name for name in info.loaded_tensors if name.startswith(VISION_PREFIXES)]
    checkpoint = open_model(str(tiny_model_dir(which)))

    def nbytes(part: str) -> int:
        return sum(t.numel() * 4 for _, t in checkpoint._read(checkpoint.part_names(part)))

    # vLLM may pad the vocabulary (to 64 rows) or repack linear weights for its CPU kernels, so
    # its bytes differ a little from the checkpoint's LLM; never by a whole vision tower.
    llm, vision = nbytes("llm"), nbytes("vision") + nbytes("projector")
    allowance = 2 * 64 * checkpoint.text_config.hidden_size * 4
    assert vision > allowance
    assert 0.99 * llm <= info.parameter_bytes <= llm + allowance


def test_sampling_features_behave_as_on_the_builtin_engine(vllm_deployment, fp32_deployment, client_for):
    """Log-probabilities, stop strings, ignore_eos and seeds: the same API behaviour on both engines."""
    conversation = to_messages(CASES["single_image"])
    on_vllm, on_builtin = client_for(vllm_deployment), client_for(fp32_deployment)

    with_logprobs = sampling(max_new_tokens=6, top_logprobs=3)
    a, b = on_vllm.generate(conversation, with_logprobs), on_builtin.generate(conversation, with_logprobs)
    assert list(a.token_ids) == list(b.token_ids) and len(a.logprobs) == 6
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.chosen.token_id == y.chosen.token_id
        assert x.chosen.logprob == pytest.approx(y.chosen.logprob, abs=1e-3)
        assert [t.token_id for t in x.top] == [t.token_id for t in y.top]

    full = on_builtin.generate(conversation, sampling(max_new_tokens=12)).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop, full
    stopped = [c.generate(conversation, sampling(max_new_tokens=12, stop=[stop])) for c in (on_vllm, on_builtin)]
    assert stopped[0].text == stopped[1].text == full[: full.index(stop)]
    assert stopped[0].finish_reason == stopped[1].finish_reason

    long = sampling(max_new_tokens=40, ignore_eos=True)
    assert len(on_vllm.generate(conversation, long).token_ids) == 40

    seeded = sampling(max_new_tokens=10, temperature=1.0, seed=1234)
    assert on_vllm.generate(conversation, seeded).token_ids == on_vllm.generate(conversation, seeded).token_ids


def test_metrics_show_vllm_engine_series_beside_dvd_ones(vllm_deployment, client_for):
    import urllib.request

    client_for(vllm_deployment).generate([message("user", "hi")], sampling(max_new_tokens=3))
    lc = vllm_deployment.config.language
    with urllib.request.urlopen(f"http://{lc.host}:{lc.metrics_port}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert "dvd_requests_total" in body and "dvd_kv_cache_used_blocks" in body
    assert "vllm:num_requests_running" in body and "vllm:kv_cache_usage_perc" in body
    blocks = next(float(line.split()[-1]) for line in body.splitlines() if line.startswith("dvd_kv_cache_blocks "))
    assert blocks > 0
