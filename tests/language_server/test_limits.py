"""The prompt-length limits: text that cannot fit is refused before tokenizing, and the
character bound refuses no prompt that fits."""

from __future__ import annotations

import pytest

from language_server.engine.sampling import SamplingParams
from language_server.limits import check_text_length
from language_server.prompt import PromptBuilder, fill_prompt, prepare_prompt
from language_server.request import ChatMessage, GenerationRequest, TextPart
from pipeline.errors import InvalidRequest


def test_text_that_cannot_fit_is_refused_without_tokenizing(tokenizer):
    builder = PromptBuilder(tokenizer)
    assert builder.max_chars_per_token >= 16
    huge = GenerationRequest("r", (ChatMessage("user", (TextPart("x" * (100 * builder.max_chars_per_token + 1)),)),),
                             SamplingParams())
    calls: list[int] = []
    builder.tokenizer = lambda *args, **kwargs: calls.append(1)
    with pytest.raises(InvalidRequest, match="characters"):
        prepare_prompt(builder, huge, max_model_len=100)
    assert calls == []


def test_the_character_bound_refuses_no_prompt_that_fits(tokenizer):
    """The densest text there is (the longest token, repeated) still passes the character check."""
    builder = PromptBuilder(tokenizer)
    to_text = tokenizer.convert_tokens_to_string
    densest = max((to_text([t]) for t in tokenizer.get_vocab()), key=lambda s: len(s.encode()))
    text = densest * 50
    req = GenerationRequest("r", (ChatMessage("user", (TextPart(text),)),), SamplingParams())
    tokens = len(fill_prompt(prepare_prompt(builder, req, max_model_len=10_000), [], 10_000).token_ids)
    check_text_length(builder, req, max_model_len=tokens + 1)



def test_reading_a_request_past_its_time_budget_is_refused(monkeypatch) -> None:
    import asyncio
    import threading
    from dataclasses import replace

    from language_server import request_reader
    from language_server.request_reader import RequestReader
    from pipeline.client import image, message
    from pipeline.config import DvDConfig
    from pipeline.errors import InvalidRequest
    from proto.dvd.v1 import generate_pb2 as pb

    release = threading.Event()
    monkeypatch.setattr(request_reader.GenerationRequest, "from_pb", lambda request, config: release.wait(30))
    config = DvDConfig()
    reader = RequestReader(replace(config, images=replace(config.images, max_decode_s=0.2)))
    request = pb.GenerateRequest(messages=[message("user", image(b"x"), image(b"x"))])
    try:
        with pytest.raises(InvalidRequest, match=r"2 media headers took over 0.4 s \(images.max_decode_s: 0.2 s each\)"):
            asyncio.run(reader.read(request))
    finally:
        release.set()
        reader.close()
