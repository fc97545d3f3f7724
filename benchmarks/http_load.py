"""Closed-loop load through an OpenAI-compatible chat API (plain vLLM's HTTP server), with the
bench's workload: the same images, prompt, output tokens and greedy decoding as `workloads.Workload`.

Each request streams (`/v1/chat/completions`, `stream: true`) with its image as a base64 data:
URL, `temperature` 0, `max_tokens` = the workload's output tokens and `ignore_eos`, so that every
request generates exactly that many tokens, as the gRPC workload's `ignore_eos` does. A request's
first token is its first chunk with non-empty content (a token that decodes to part of a
character arrives with the next one); its output tokens are the final usage chunk's
`completion_tokens`. Results are `load.LoadResult`s, so `load.summarize` applies.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, Callable

from benchmarks.load import LoadResult, RequestRecord
from benchmarks.workloads import PROMPT, Workload

DONE = "[DONE]"


def data_url(image: bytes) -> str:
    """An image as a data: URL (JPEG, as the bench's workloads encode it)."""
    return "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")


def chat_body(model: str, image: bytes | None, output_tokens: int, prompt: str = PROMPT) -> dict[str, Any]:
    """The request body of one streamed, greedy chat request of exactly `output_tokens` tokens;
    text only when `image` is None."""
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": output_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip


def workload_bodies(workload: Workload, model: str) -> Callable[[int], dict[str, Any]]:
    """Request `index` of the workload as a chat body, with a unique image as `Workload.request(index)` sends."""
    return lambda index: chat_body(model, workload.image(index), workload.output_tokens)


def parse_sse_line(line: bytes | str) -> dict[str, Any] | str | None:
    """One line of a server-sent event stream: the JSON of a `data:` line, DONE for `data: [DONE]`,
    None for anything else (blank separators, comments, other fields)."""
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    text = text.rstrip("\r\n")
    if not text.startswith("data:"):
        return None
    payload = text[len("data:"):].strip()
    if payload == DONE:
        return DONE
    return json.loads(payload)


def apply_event(record: RequestRecord, event: dict[str, Any] | str, now: float) -> None:
    """Update a request's record with one parsed event that arrived at `now`."""
    if event == DONE:
        if record.first_token is None:  # summarize needs a first token of every completed request
            record.error = "the stream ended without content"
        else:
            record.done = now
        return
    if "error" in event:  # an error after the stream started
        error = event["error"]
        record.error = f"stream error: {error.get('message', error) if isinstance(error, dict) else error}"
        return
    for choice in event.get("choices") or ():
        if record.first_token is None and (choice.get("delta") or {}).get("content"):
            record.first_token = now
    usage = event.get("usage")
    if usage:
        record.output_tokens = int(usage.get("completion_tokens", 0))


async def _one(session: Any, url: str, body: dict[str, Any], record: RequestRecord, timeout_s: float) -> None:
    import aiohttp

    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return
                async for line in response.content:
                    event = parse_sse_line(line)
                    if event is not None:
                        apply_event(record, event, time.perf_counter())
                    if record.error is not None or record.done is not None:
                        return
        record.error = "the stream ended before [DONE]"
    except TimeoutError:
        record.error = f"no [DONE] within {timeout_s:g} s"
    except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a data line that is not JSON
        record.error = f"{type(exc).__name__}: {exc}"


async def run_chat_load(
    base_url: str,
    make_body: Callable[[int], dict[str, Any]],
    total: int,
    concurrency: int,
    timeout_s: float = 600.0,
    progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Send `total` chat requests to `base_url`/v1/chat/completions from `concurrency` closed-loop
    workers; records in send order, as `load.run_load` keeps them."""
    import aiohttp

    if concurrency < 1:
        raise ValueError(f"the concurrency must be >= 1, got {concurrency}")
    result = LoadResult(first_wave=concurrency)
    url = f"{base_url}/v1/chat/completions"
    counter = iter(range(total))
    done_count = 0
    # one connection per worker, none reused across a limit; no client-side total timeout (_one's)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def worker() -> None:
            nonlocal done_count
            for index in counter:
                record = RequestRecord(sent=time.perf_counter())
                result.records.append(record)
                await _one(session, url, make_body(index), record, timeout_s)
                done_count += 1
                if progress is not None:
                    progress(done_count)

        result.started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.finished = time.perf_counter()
    return result
