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

