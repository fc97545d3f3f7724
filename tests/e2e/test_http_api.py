"""The OpenAI-compatible HTTP API through real servers and the official `openai` client: the same
requests, tokens and errors as the gRPC API."""

from __future__ import annotations

import base64
import shutil
import subprocess

import httpx
import openai
import pytest

from pipeline.entrypoints.cli import curl_command
from pipeline.client import image, message, sampling
from tests.conftest import photo_bytes, requires_vllm
from tests.waiting import wait_until

MODEL = "tiny"
WAIT_S = 60.0


def client_of(deployment, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployment.http_url}/v1", api_key=api_key, max_retries=0, timeout=120)


def data_url(data: bytes, kind: str = "image/jpeg") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def ask(url: str, question: str = "What is in this image?", **image_options) -> list[dict]:
    part = {"type": "image_url", "image_url": {"url": url, **image_options}}
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def token_ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def metric(deployment, series: str) -> float:
    body = httpx.get(f"{deployment.http_url}/metrics", timeout=10).text
    return next(float(line.split()[-1]) for line in body.splitlines() if line.startswith(series + " "))


@pytest.fixture(scope="module")
def http(fp32_deployment) -> openai.OpenAI:
    return client_of(fp32_deployment)


def _two_turns() -> tuple[list[dict], list]:
    coffee, chelsea = photo_bytes("coffee"), photo_bytes("chelsea")
    over_http = [
        *ask(data_url(coffee), "Describe the picture.", detail="low"),
        {"role": "assistant", "content": "A cup of coffee."},
        *ask(data_url(chelsea), "And this one?", max_tiles=2),
    ]
    over_grpc = [
        message("user", image(coffee, max_tiles=1), "Describe the picture."),
        message("assistant", "A cup of coffee."),
        message("user", image(chelsea, max_tiles=2), "And this one?"),
    ]
    return over_http, over_grpc


def test_non_streaming_with_an_image(http):
    reply = http.chat.completions.create(
        model=MODEL, messages=ask(data_url(photo_bytes("coffee"))), max_tokens=6, temperature=0
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == len(token_ids(choice)) <= 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.model_extra["image_tiles"] > 1  # detail "auto": the server's tiling
    assert reply.model_extra["timings"]["total_ms"] > 0


def test_streaming_with_an_image_ends_with_usage_and_matches_non_streaming(http):
    messages = ask(data_url(photo_bytes("chelsea")), detail="low")
    chunks = list(http.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    whole = http.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed_ids = [t for c in chunks if c.choices for t in token_ids(c.choices[0])]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert (text, streamed_ids) == (whole.choices[0].message.content, token_ids(whole.choices[0]))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == len(streamed_ids)
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.model_extra["image_tiles"] == 1  # detail "low": one tile


def test_a_greedy_request_gives_the_same_tokens_over_http_and_grpc(http, fp32_deployment, client_for):
    photo = photo_bytes("rocket")
    over_http = http.chat.completions.create(model=MODEL, messages=ask(data_url(photo)), max_tokens=10, temperature=0)
    over_grpc = client_for(fp32_deployment).generate(
        [message("user", image(photo), "What is in this image?")], sampling(max_new_tokens=10)
    )
    assert token_ids(over_http.choices[0]) == list(over_grpc.token_ids)
    assert over_http.choices[0].message.content == over_grpc.text


def test_images_in_two_turns_give_the_same_tokens_over_http_and_grpc(http, fp32_deployment, client_for):
    over_http, over_grpc = _two_turns()
    reply = http.chat.completions.create(model=MODEL, messages=over_http, max_tokens=10, temperature=0)
    result = client_for(fp32_deployment).generate(over_grpc, sampling(max_new_tokens=10))
    assert token_ids(reply.choices[0]) == list(result.token_ids)
    assert reply.usage.model_extra["image_tiles"] == result.usage.image_tiles > 2


def test_the_same_seed_gives_the_same_text(http):
    def sample() -> tuple[str, list[int]]:
        reply = http.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
            temperature=1.0, top_p=0.95, seed=1234,
        )
        return reply.choices[0].message.content, token_ids(reply.choices[0])

    assert sample() == sample()


def test_logprobs_in_openai_shape(http, tokenizer):
    reply = http.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3,
    )
    choice = reply.choices[0]
    assert [p.token for p in choice.logprobs.content] == [tokenizer.decode([t]) for t in token_ids(choice)]
    for position in choice.logprobs.content:
        assert len(position.top_logprobs) == 3
        assert position.top_logprobs[0].token == position.token  # greedy: the chosen token is the likeliest
        assert position.logprob == pytest.approx(position.top_logprobs[0].logprob)


def test_models_health_and_metrics(http, fp32_deployment):
    assert [m.id for m in http.models.list()] == [MODEL]
    assert httpx.get(f"{fp32_deployment.http_url}/health", timeout=10).status_code == 200
    assert metric(fp32_deployment, "dvd_kv_cache_blocks") > 0


def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(http, fp32_deployment):
    stream = http.chat.completions.create(
        model=MODEL, messages=ask(data_url(photo_bytes("astronaut")), detail="low"), max_tokens=4000,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    assert all(next(chunks).choices for _ in range(4))
    assert metric(fp32_deployment, "dvd_kv_cache_used_blocks") > 0  # the request holds blocks while it streams
    stream.close()
    assert wait_until(lambda: metric(fp32_deployment, "dvd_kv_cache_used_blocks") == 0, timeout_s=WAIT_S)


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("base64") is None, reason="needs curl and base64")
def test_the_curl_command_that_serve_prints_works(fp32_deployment):
    command = curl_command(fp32_deployment)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reply = openai.types.chat.ChatCompletion.model_validate_json(done.stdout)
    assert reply.choices[0].message.role == "assistant" and reply.usage.model_extra["image_tiles"] >= 1


@requires_vllm
def test_on_the_vllm_engine_http_gives_the_builtin_engines_tokens_and_frees_blocks(vllm_deployment, fp32_deployment,
                                                                                   client_for):
    on_vllm = client_of(vllm_deployment)
    over_http, over_grpc = _two_turns()
    chunks = list(on_vllm.chat.completions.create(
        model=MODEL, messages=over_http, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    result = client_for(fp32_deployment).generate(over_grpc, sampling(max_new_tokens=10))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == result.text
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == result.usage.prompt_tokens

    stream = on_vllm.chat.completions.create(
        model=MODEL, messages=ask(data_url(photo_bytes("astronaut")), detail="low"), max_tokens=4000,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
    )
    pieces = iter(stream)
    assert all(next(pieces).choices for _ in range(4))
    stream.close()
    assert wait_until(lambda: metric(vllm_deployment, "dvd_kv_cache_used_blocks") == 0, timeout_s=WAIT_S)
