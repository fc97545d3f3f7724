"""The OpenAI-chat load client: its request bodies, and how it turns a server-sent event stream into
request records, against a small local SSE server that answers like vLLM's chat endpoint."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math

import pytest
from PIL import Image

from benchmarks.http_load import DONE, apply_event, chat_body, parse_sse_line, run_chat_load, workload_bodies
from benchmarks.load import RequestRecord, summarize
from benchmarks.workloads import PROMPT, STAMP, Workload

web = pytest.importorskip("aiohttp.web")


def jpeg(colour: tuple[int, int, int], side: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def same_outside_the_stamp(a: Image.Image, b: Image.Image) -> bool:
    """Equal sizes, and pixels within JPEG noise of each other away from the stamped corner."""
    if a.size != b.size:
        return False
    region = (STAMP + 8, STAMP + 8, a.width, a.height)
    pairs = zip(a.crop(region).tobytes(), b.crop(region).tobytes())
    return max(abs(x - y) for x, y in pairs) <= 8


def chunk(content: str | None = None, role: str | None = None, usage: dict | None = None) -> dict:
    if usage is not None:
        return {"object": "chat.completion.chunk", "choices": [], "usage": usage}
    delta = {**({"role": role} if role else {}), **({"content": content} if content is not None else {})}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def test_chat_body_asks_for_exactly_the_output_tokens_greedily_with_the_image_inline() -> None:
    body = chat_body("bench", b"\xff\xd8jpeg", 32)
    assert (body["model"], body["max_tokens"], body["temperature"], body["ignore_eos"]) == ("bench", 32, 0.0, True)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    (message,) = body["messages"]
    image, text = message["content"]
    assert message["role"] == "user" and text == {"type": "text", "text": PROMPT}
    prefix, encoded = image["image_url"]["url"].split(",", 1)
    assert prefix == "data:image/jpeg;base64" and base64.b64decode(encoded) == b"\xff\xd8jpeg"


def test_workload_bodies_send_a_unique_image_of_the_photo_the_grpc_workload_sends() -> None:
    photos = tuple(jpeg(colour) for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200)))
    workload = Workload("896px", 896, photos, 16)
    bodies = workload_bodies(workload, "bench")
    seen = set()
    for index in range(5):
        url = bodies(index)["messages"][0]["content"][0]["image_url"]["url"]
        sent = decoded(base64.b64decode(url.split(",", 1)[1]))
        assert same_outside_the_stamp(sent, decoded(photos[index % 3]))
        seen.add(sent.tobytes())
        assert bodies(index)["max_tokens"] == 16
    grpc_image = workload.request(0).messages[0].content[0].image.data
    assert same_outside_the_stamp(decoded(grpc_image), decoded(photos[0]))
    seen.add(decoded(grpc_image).tobytes())
    assert len(seen) == 6  # no two requests carry the same pixels


def test_sse_lines_parse_to_events() -> None:
    assert parse_sse_line(b'data: {"choices": []}\n') == {"choices": []}
    assert parse_sse_line("data:[DONE]\r\n") == DONE
    assert parse_sse_line(b"\n") is None and parse_sse_line(b": keep-alive\n") is None
    assert parse_sse_line(b"event: message\n") is None
    with pytest.raises(ValueError):
        parse_sse_line(b"data: {not json\n")


def test_events_set_the_first_token_at_the_first_content_and_count_tokens_from_usage() -> None:
    record = RequestRecord(sent=0.0)
    apply_event(record, chunk(role="assistant", content=""), 1.0)  # vLLM's role chunk holds no token
    assert record.first_token is None
    apply_event(record, chunk(content="Hello"), 2.0)
    apply_event(record, chunk(content=" world"), 3.0)
    apply_event(record, chunk(usage={"prompt_tokens": 1297, "completion_tokens": 2, "total_tokens": 1299}), 3.5)
    apply_event(record, DONE, 4.0)
    assert (record.ttft_s, record.e2e_s, record.output_tokens, record.completed) == (2.0, 4.0, 2, True)


def test_an_error_event_or_a_stream_without_content_fails_the_request() -> None:
    record = RequestRecord(sent=0.0)
    apply_event(record, {"error": {"message": "boom", "code": 500}}, 1.0)
    assert record.error == "stream error: boom" and not record.completed
    empty = RequestRecord(sent=0.0)
    apply_event(empty, DONE, 1.0)
    assert empty.error == "the stream ended without content" and not empty.completed


class SseServer:
    """A local chat endpoint: each request gets the stream `script(body)` returns, as a list of
    (seconds to wait, raw line) pairs, or an HTTP status with a message."""

    def __init__(self, script) -> None:
        self.script = script
        self.bodies: list[dict] = []
        self.in_flight = self.most_in_flight = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            steps = self.script(body)
            if isinstance(steps, int):
                return web.Response(status=steps, text="bad request: max_tokens too large")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for delay, line in steps:
                await asyncio.sleep(delay)  # the server's pacing, not the client's synchronisation
                await response.write(line.encode())
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def data(event: dict | str) -> str:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"


def streamed(body: dict) -> list[tuple[float, str]]:
    tokens = body["max_tokens"]
    return [(0.0, data(chunk(role="assistant", content=""))), (0.05, data(chunk(content="t0")))] + [
        (0.0, data(chunk(content=f" t{i}"))) for i in range(1, tokens)
    ] + [(0.0, data(chunk(usage={"prompt_tokens": 10, "completion_tokens": tokens}))), (0.0, data("[DONE]"))]


def test_a_closed_loop_records_every_request_from_the_stream() -> None:
    server = SseServer(streamed)

    async def main():
        async with server as url:
            return await run_chat_load(url, lambda i: {"model": "m", "max_tokens": 3 + i % 2, "i": i}, 7,
                                       concurrency=3, timeout_s=30)

    result = asyncio.run(main())
    assert result.first_wave == 3 and len(result.records) == 7
    assert sorted(body["i"] for body in server.bodies) == list(range(7))
    assert server.most_in_flight <= 3
    for record in result.records:
        assert record.completed and record.error is None
        assert record.output_tokens in (3, 4)
        assert 0.04 < record.ttft_s <= record.e2e_s
    summary = summarize([result])
    assert summary["completed"] == 7 and summary["errors"] == 0
    assert summary["output_token_throughput"] == sum(r.output_tokens for r in result.records) / summary["wall_s"]
    assert math.isfinite(summary["ttft_p99_s"]) and math.isfinite(summary["steady_request_throughput"])


@pytest.mark.parametrize(("script", "error"), [
    (lambda body: 400, "HTTP 400: bad request: max_tokens too large"),
    (lambda body: streamed(body)[:-1], "the stream ended before [DONE]"),
    (lambda body: [(0.0, data({"error": {"message": "engine dead"}}))], "stream error: engine dead"),
    (lambda body: [(0.0, "data: {oops\n\n")], "JSONDecodeError"),
    (lambda body: [(5.0, data("[DONE]"))], "no [DONE] within 0.3 s"),
])
def test_failed_requests_are_recorded_as_errors(script, error) -> None:
    async def main():
        async with SseServer(script) as url:
            return await run_chat_load(url, lambda i: {"max_tokens": 2}, 2, concurrency=1, timeout_s=0.3)

    result = asyncio.run(main())
    assert all(error in (record.error or "") and not record.completed for record in result.records)
    assert summarize([result])["errors"] == 2


def test_a_closed_loop_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        asyncio.run(run_chat_load("http://127.0.0.1:9", lambda i: {}, 1, concurrency=0))
