"""OpenAI chat-completion responses and stream chunks built from dvd.v1 results and deltas.

Extensions beside OpenAI's fields: `token_ids` on every choice (the generated ids, as vLLM's
`return_token_ids` gives them), `timings` (per-span milliseconds) on the response and on the
stream's finishing chunk, and `image_tokens` / `image_tiles` in `usage`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from google.protobuf.json_format import MessageToDict

from proto.dvd.v1 import generate_pb2 as pb

FINISH_REASONS = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_STOP_STRING: "stop"}


class ResponseBuilder:
    """Builds the responses of one request (one id, one creation time)."""

    def __init__(self, request_id: str, model: str, tokenizer: Any, top_logprobs: int | None) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.top_logprobs = top_logprobs  # None: no logprobs asked for

    def completion(self, result: pb.GenerateResult) -> dict[str, Any]:
        """The whole non-streaming response."""
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": self._logprobs(result.logprobs),
            "finish_reason": FINISH_REASONS[result.finish_reason],
            "token_ids": list(result.token_ids),
        }
        return {
            **self._head("chat.completion"),
            "choices": [choice],
            "usage": usage(result.usage),
            "timings": timings(result.timings),
        }

    def first_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None, [])

    def delta_chunk(self, delta: pb.TokenDelta) -> dict[str, Any]:
        chunk = self._chunk({"content": delta.text}, None, list(delta.token_ids))
        chunk["choices"][0]["logprobs"] = self._logprobs(delta.logprobs)
        return chunk

    def finish_chunk(self, result: pb.GenerateResult) -> dict[str, Any]:
        chunk = self._chunk({}, FINISH_REASONS[result.finish_reason], [])
        chunk["timings"] = timings(result.timings)
        return chunk

    def usage_chunk(self, result: pb.GenerateResult) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage(result.usage)}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: dict[str, Any], finish: str | None, token_ids: list[int]) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "token_ids": token_ids}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def _logprobs(self, positions: Any) -> dict[str, Any] | None:
        if self.top_logprobs is None:
            return None
        content = []
        for position in positions:
            entry = self._token(position.chosen)
            entry["top_logprobs"] = [self._token(t) for t in position.top[: self.top_logprobs]]
            content.append(entry)
        return {"content": content, "refusal": None}

    def _token(self, token: pb.TokenLogprob) -> dict[str, Any]:
        text = self.tokenizer.decode([token.token_id])
        return {"token": text, "logprob": token.logprob, "bytes": list(text.encode("utf-8"))}


def usage(u: pb.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "image_tokens": u.image_tokens,
        "image_tiles": u.image_tiles,
    }


def timings(t: pb.Timings) -> dict[str, float]:
    return MessageToDict(t, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def sse(event: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    return f"data: {event if isinstance(event, str) else json.dumps(event, separators=(',', ':'))}\n\n".encode()


def error_body(message: str, kind: str, code: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
