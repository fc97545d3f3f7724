"""The HTTP API's refusals: bad requests get the `openai` exception of their status with a message
naming the problem (and the server keeps serving), API keys, file:// and http(s):// media URLs,
size limits."""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import subprocess
import threading

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from pipeline.entrypoints.cli import curl_command
from pipeline.errors import MAX_MESSAGE_CHARS
from tests.conftest import photo_bytes
from tests.e2e.test_http_api import MODEL, ask, client_of, data_url

KEY = "s3cret"
TEXT = [{"role": "user", "content": "Hello"}]


def _noise_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "n_above_one": ({"n": 2}, openai.BadRequestError, "n must be 1"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
              openai.BadRequestError, "tools is not supported"),
    "response_format": ({"response_format": {"type": "json_object"}}, openai.BadRequestError, "response_format"),
    "presence_penalty": ({"presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty is not supported"),
    "logit_bias": ({"logit_bias": {"1": 5}}, openai.BadRequestError, "logit_bias is not supported"),
    "audio_output": ({"modalities": ["text", "audio"]}, openai.BadRequestError, "modalities is not supported"),
    "unknown_field": ({"extra_body": {"colour": "blue"}}, openai.BadRequestError, "colour: unknown field"),
    "unknown_model": ({"model": "gpt-4o"}, openai.NotFoundError, "'gpt-4o' is not served here"),
    "zero_max_tokens": ({"max_tokens": 0}, openai.BadRequestError, "max_new_tokens must be > 0"),
    "negative_temperature": ({"temperature": -1}, openai.BadRequestError, "temperature must be >= 0"),
    "top_p_zero": ({"top_p": 0}, openai.BadRequestError, "top_p must be in (0, 1]"),
    "too_many_top_logprobs": ({"logprobs": True, "top_logprobs": 21}, openai.BadRequestError, "top_logprobs must be in 0..20"),
    "top_logprobs_alone": ({"top_logprobs": 2}, openai.BadRequestError, "top_logprobs needs logprobs"),
    "stream_options_alone": ({"stream_options": {"include_usage": True}}, openai.BadRequestError, "stream_options"),
    "empty_messages": ({"messages": []}, openai.BadRequestError, "messages is empty"),
    "assistant_last": ({"messages": [*TEXT, {"role": "assistant", "content": "Hi"}]}, openai.BadRequestError,
                       "the last message must come from the user"),
    "tool_role": ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, openai.BadRequestError,
                  "messages[0].role"),
    "audio_part": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
                   openai.BadRequestError, "input_audio"),
    "bad_base64": ({"messages": ask("data:image/png;base64,@@@@")}, openai.BadRequestError, "not valid base64"),
    "not_an_image": ({"messages": ask(data_url(b"garbage" * 40))}, openai.BadRequestError, "image"),
    "too_many_tiles": ({"messages": ask(data_url(photo_bytes("coffee")), max_tiles=40)}, openai.BadRequestError,
                       "max_tiles must be in 1..12"),
    "ftp_url": ({"messages": ask("ftp://example.com/a.png")}, openai.BadRequestError, "unsupported URL"),
    "file_urls_off": ({"messages": ask("file:///etc/hostname")}, openai.BadRequestError,
                      "language.allowed_media_dirs is empty"),
    "remote_urls_off": ({"messages": ask("http://127.0.0.1:9/a.png")}, openai.BadRequestError,
                        "language.fetch_remote_media is false"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_its_status_and_the_next_one_succeeds(case, fp32_deployment):
    fields, error, expected = BAD_REQUESTS[case]
    client = client_of(fp32_deployment)
    with pytest.raises(error) as info:
        client.chat.completions.create(**{"model": MODEL, "messages": TEXT, "max_tokens": 2, **fields})
    assert expected in info.value.body["message"]
    assert set(info.value.body) == {"message", "type", "param", "code"}
    reply = client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens >= 1


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory):
    allowed, outside = tmp_path_factory.mktemp("allowed"), tmp_path_factory.mktemp("outside")
    (allowed / "chelsea.jpg").write_bytes(photo_bytes("chelsea"))
    (allowed / "noise.png").write_bytes(_noise_png(340))  # ~350 kB: over remote_media_max_bytes
    (outside / "coffee.jpg").write_bytes(photo_bytes("coffee"))
    os.symlink(outside / "coffee.jpg", allowed / "escape.jpg")
    return allowed, outside


@pytest.fixture(scope="module")
def guarded(start_deployment, media_dirs):
    """Colocated, with an API key, file:// URLs under one directory, remote fetching and small limits."""
    return start_deployment({
        "mode": "colocated", "language.api_key": KEY, "language.allowed_media_dirs": [str(media_dirs[0])],
        "language.fetch_remote_media": True, "language.remote_media_max_bytes": 300_000,
        "images.max_image_bytes": 400_000, "video.max_video_bytes": 1_000_000,
        "language.max_request_bytes": 2_000_000,
    }, name="http_guarded")


@pytest.fixture(scope="module")
def file_server(media_dirs):
    """A loopback HTTP server of the allowed directory."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dirs[0]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(10)


def _ask(deployment, url: str, key: str = KEY):
    return client_of(deployment, key).chat.completions.create(model=MODEL, messages=ask(url), max_tokens=2)


def test_api_key_is_required_as_a_bearer_token(guarded):
    response = httpx.post(f"{guarded.http_url}/v1/chat/completions", json={"model": MODEL, "messages": TEXT}, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        client_of(guarded, "wrong").models.list()
    assert [m.id for m in client_of(guarded, KEY).models.list()] == [MODEL]
    assert httpx.get(f"{guarded.http_url}/health", timeout=10).status_code == 200  # open, like gRPC health


def test_file_urls_only_under_allowed_dirs(guarded, media_dirs):
    allowed, outside = media_dirs
    assert _ask(guarded, (allowed / "chelsea.jpg").as_uri()).usage.model_extra["image_tiles"] >= 1
    for path in (outside / "coffee.jpg", allowed / "escape.jpg", allowed / ".." / outside.name / "coffee.jpg"):
        with pytest.raises(openai.BadRequestError, match="outside language.allowed_media_dirs"):
            _ask(guarded, f"file://{path}")
    with pytest.raises(openai.BadRequestError, match="no such file"):
        _ask(guarded, (allowed / "absent.jpg").as_uri())


def test_remote_urls_are_fetched_within_their_limit(guarded, file_server):
    assert _ask(guarded, f"{file_server}/chelsea.jpg").usage.model_extra["image_tiles"] >= 1
    with pytest.raises(openai.APIStatusError, match="over the limit of 300000 bytes") as info:
        _ask(guarded, f"{file_server}/noise.png")
    assert info.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="answered HTTP 404"):
        _ask(guarded, f"{file_server}/absent.png")


def test_too_large_images_and_bodies_get_413(guarded):
    with pytest.raises(openai.APIStatusError, match="image is .* bytes, over the limit of 400000") as info:
        _ask(guarded, data_url(_noise_png(420), "image/png"))
    assert info.value.status_code == 413
    with pytest.raises(openai.APIStatusError, match="language.max_request_bytes") as info:
        client_of(guarded, KEY).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * 2_100_000}], max_tokens=2
        )
    assert info.value.status_code == 413
    assert _ask(guarded, data_url(photo_bytes("chelsea"))).usage.completion_tokens >= 1


@pytest.mark.parametrize("stop", [["x" * 100_000], ["", "x" * 100_000]], ids=["long", "long_and_empty"])
def test_an_over_long_field_gets_a_short_message(stop, fp32_deployment):
    client = client_of(fp32_deployment)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=2, stop=stop)
    assert "stop" in info.value.body["message"] and len(info.value.body["message"]) <= MAX_MESSAGE_CHARS
    assert client.chat.completions.create(model=MODEL, messages=TEXT, max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("base64") is None, reason="needs curl and base64")
def test_the_printed_curl_command_reads_the_api_key_from_the_environment(guarded):
    command = curl_command(guarded)
    assert KEY not in command
    env = {**os.environ, "DVD_API_KEY": KEY}
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert openai.types.chat.ChatCompletion.model_validate_json(done.stdout).choices[0].message.role == "assistant"
