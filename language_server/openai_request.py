"""OpenAI chat-completion request bodies, and their translation into a dvd.v1 GenerateRequest.

The translation only moves fields: every limit and value check is the gRPC API's own
(language_server/request.py, language_server/limits.py), applied when GenerationService runs the
translated request; only the media count is checked early too, before any URL is loaded.
Fields the server cannot honour are refused by name, never ignored.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from language_server.media_urls import MediaUrls
from language_server.limits import check_media_count
from pipeline.client import ROLES
from pipeline.errors import InvalidRequest
from proto.dvd.v1 import generate_pb2 as pb

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextContent(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"
    max_tiles: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None  # DvD extension: exact tile limit


class ImageContent(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class VideoUrl(_Strict):
    url: str
    num_segments: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None  # DvD extension
    max_tiles_per_frame: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None  # DvD extension


class VideoContent(_Strict):
    type: Literal["video_url"]
    video_url: VideoUrl


ContentPart = Annotated[TextContent | ImageContent | VideoContent, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """POST /v1/chat/completions. Unknown fields are refused (extra="forbid"); the fields below
    typed `Any` are known OpenAI fields this server refuses unless they carry their neutral value."""

    model: str
    messages: list[ChatMessage]
    max_tokens: Annotated[int, Field(le=INT32_MAX, ge=-(2**31))] | None = None
    max_completion_tokens: Annotated[int, Field(le=INT32_MAX, ge=-(2**31))] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Annotated[int, Field(ge=0, le=UINT64_MAX)] | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None  # an end-user id for the caller's own records; only logged by OpenAI too
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    # OpenAI fields the server cannot honour
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    logit_bias: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


_UNSUPPORTED = (
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format", "logit_bias",
    "audio", "modalities", "prediction", "reasoning_effort", "web_search_options",
)


def refuse_unsupported(body: ChatCompletionRequest) -> None:
    """InvalidRequest naming the first field set to something this server cannot do."""
    for name in _UNSUPPORTED:
        if getattr(body, name) is not None:
            raise InvalidRequest(f"{name} is not supported by this server", param=name)
    if body.n != 1:
        raise InvalidRequest(f"n must be 1 (one choice per request), got {body.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) != 0:
            raise InvalidRequest(f"{name} is not supported (only 0); use repetition_penalty", param=name)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed with stream: true", param="stream_options")
    if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
        raise InvalidRequest("max_tokens and max_completion_tokens differ; send one of them", param="max_tokens")


async def to_generate_request(body: ChatCompletionRequest, urls: MediaUrls, tiles_low: int) -> pb.GenerateRequest:
    """The GenerateRequest for a checked body; media URLs are loaded (concurrently) on the way.
    `tiles_low` is the tile limit of images sent with detail "low"."""
    refuse_unsupported(body)
    media = [p for m in body.messages if isinstance(m.content, list) for p in m.content if p.type != "text"]
    check_media_count(len(media), urls.config)
    messages = [pb.Message(role=ROLES["system" if m.role == "developer" else m.role]) for m in body.messages]
    loads = []
    for i, (message, out) in enumerate(zip(body.messages, messages)):
        where = f"messages[{i}]"
        if message.content is None:
            raise InvalidRequest(f"{where}.content is missing", param=f"{where}.content")
        parts = [TextContent(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        for j, part in enumerate(parts):
            loads.append(_part(part, out.content.add(), f"{where}.content[{j}]", urls, tiles_low))
    await asyncio.gather(*loads)
    return pb.GenerateRequest(request_id=uuid.uuid4().hex, messages=messages, sampling=_sampling(body))


async def _part(part: ContentPart, out: pb.ContentPart, where: str, urls: MediaUrls, tiles_low: int) -> None:
    if isinstance(part, TextContent):
        out.text = part.text
    elif isinstance(part, ImageContent):
        image = part.image_url
        tiles = image.max_tiles or (tiles_low if image.detail == "low" else 0)
        data = await urls.load(image.url, "image", f"{where}.image_url")
        out.image.CopyFrom(pb.ImageInput(data=data, max_tiles=tiles))
    else:
        video = part.video_url
        data = await urls.load(video.url, "video", f"{where}.video_url")
        out.video.CopyFrom(
            pb.VideoInput(data=data, num_segments=video.num_segments or 0,
                          max_tiles_per_frame=video.max_tiles_per_frame or 0)
        )


def _sampling(body: ChatCompletionRequest) -> pb.SamplingParameters:
    params = pb.SamplingParameters(ignore_eos=body.ignore_eos)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None:
        params.max_new_tokens = max_tokens
    # OpenAI's default temperature is 1 (sampling); the gRPC API's is 0 (greedy)
    params.temperature = 1.0 if body.temperature is None else body.temperature
    if body.top_p is not None:
        params.top_p = body.top_p
    if body.top_k is not None:
        params.top_k = max(body.top_k, 0)  # vLLM: -1 = off
    if body.repetition_penalty is not None:
        params.repetition_penalty = body.repetition_penalty
    if body.seed is not None:
        params.seed = body.seed
    if body.stop is not None:
        params.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.logprobs:
        # the chosen token's log-probability comes with the top list; at least one is asked for
        params.top_logprobs = max(body.top_logprobs or 0, 1)
    return params
