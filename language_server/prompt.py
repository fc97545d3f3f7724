"""Prompt assembly with the `internvl2_5` chat template (Qwen ChatML).

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{parts}<|im_end|>\n ... <|im_start|>assistant\n

An image becomes `<img>` + N x `<IMG_CONTEXT>` + `</img>` + "\n", with N the feature rows the
vision server reported, unlabelled, as the checkpoints' HF chat templates write it (labels such
as "Image-1: " are the user's to write). A video becomes one "Frame{i}: <img>...</img>\n" line
per sampled frame.

The default system prompt is the checkpoint's: InternVL3 templates open a conversation that has
none with their own system turn, InternVL3.5 templates add none (`template_system_prompt`).
`template_mismatch` compares this layout with the checkpoint's template on text-only probes.

Text runs between special tokens are tokenized separately, exactly as a tokenizer splits a
rendered template at its special tokens, but with special-token strings inside user text
treated as plain text, so a user cannot forge `<IMG_CONTEXT>` or `<|im_end|>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from language_server.request import ChatMessage, ImagePart, TextPart, VideoPart


@dataclass(frozen=True)
class MediaLayout:
    """Feature rows of one image or video, as reported in its FeatureHeader."""

    tile_tokens: tuple[int, ...]
    frame_tiles: tuple[int, ...] = ()  # videos: tiles of each frame

    @property
    def rows(self) -> int:
        return sum(self.tile_tokens)


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    image_tokens: int


class PromptBuilder:
    """Renders chat messages and media layouts into token ids."""

    def __init__(self, tokenizer, system_prompt: str | None = None) -> None:
        """`system_prompt`: None = the chat template's default (none if it has none), "" = none."""
        self.tokenizer = tokenizer
        self.system_prompt = template_system_prompt(tokenizer) if system_prompt is None else system_prompt
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"the tokenizer lacks InternVL special tokens {missing}")
        self.im_start, self.im_end = ids["<|im_start|>"], ids["<|im_end|>"]
        self.img_start, self.img_end, self.img_context = ids["<img>"], ids["</img>"], ids["<IMG_CONTEXT>"]

    @cached_property
    def max_chars_per_token(self) -> int:
        """The most characters of text one token can stand for (its longest token in UTF-8 bytes):
        text longer than max_model_len times this cannot fit, however it tokenizes."""
        to_text = self.tokenizer.convert_tokens_to_string
        return max(len(to_text([token]).encode()) for token in self.tokenizer.get_vocab())

    def build(self, messages: tuple[ChatMessage, ...], layouts: list[MediaLayout]) -> Prompt:
        """Token ids of the conversation followed by the assistant's turn opener."""
        if self.system_prompt and messages[0].role != "system":
            messages = (ChatMessage("system", (TextPart(self.system_prompt),)), *messages)
        pieces: list[str | list[int]] = []
        media = iter(layouts)
        for message in messages:
            pieces += [[self.im_start], f"{message.role}\n"]
            for part in message.parts:
                if isinstance(part, TextPart):
                    pieces.append(part.text)
                elif isinstance(part, ImagePart):
                    pieces += [self._image_block(next(media).rows), "\n"]
                elif isinstance(part, VideoPart):
                    pieces += self._video_lines(next(media))
            pieces += [[self.im_end], "\n"]
        pieces += [[self.im_start], "assistant\n"]
        token_ids = self._tokenize(pieces)
        return Prompt(token_ids=token_ids, image_tokens=sum(layout.rows for layout in layouts))

    def _image_block(self, rows: int) -> list[int]:
        return [self.img_start, *([self.img_context] * rows), self.img_end]

    def _video_lines(self, layout: MediaLayout) -> list[str | list[int]]:
        lines: list[str | list[int]] = []
        start = 0
        for frame, tiles in enumerate(layout.frame_tiles, 1):
            rows = sum(layout.tile_tokens[start : start + tiles])
            start += tiles
            lines += [f"Frame{frame}: ", self._image_block(rows), "\n"]
        return lines

    def _tokenize(self, pieces: list[str | list[int]]) -> list[int]:
        ids: list[int] = []
        text = ""
        for piece in pieces:
            if isinstance(piece, str):
                text += piece
                continue
            ids += self._encode_text(text)
            text = ""
            ids += piece
        return ids + self._encode_text(text)

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


SYSTEM_OPENER = "<|im_start|>system\n"
_PROBE_USER = "Hello, who are you?"
_PROBE_TURNS = (("system", "Answer briefly."), ("user", "Hi!"), ("assistant", "Hello."), ("user", _PROBE_USER))


def render_template(tokenizer, turns: tuple[tuple[str, str], ...]) -> str | None:
    """The tokenizer's chat template rendered for text-only (role, text) turns with the assistant's
    opener; None when it has no template or cannot render them (as strings or as text parts)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    as_strings: list[dict[str, Any]] = [{"role": r, "content": t} for r, t in turns]
    as_parts: list[dict[str, Any]] = [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns]
    for conversation in (as_strings, as_parts):
        try:
            return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template may reject one content shape (or raise on anything)
            continue
    return None


def template_system_prompt(tokenizer) -> str:
    """The system prompt the chat template puts before a conversation that has none ("" if none)."""
    text = render_template(tokenizer, (("user", _PROBE_USER),))
    if text is None or not text.startswith(SYSTEM_OPENER):
        return ""
    end = text.find("<|im_end|>", len(SYSTEM_OPENER))
    return text[len(SYSTEM_OPENER) : end] if end >= 0 else ""


def template_mismatch(builder: PromptBuilder) -> str | None:
    """Why `builder`'s prompts differ from the tokenizer's chat template on text-only probe
    conversations (None when they agree or the checkpoint has no template)."""
    tokenizer = builder.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return None
    probes = [_PROBE_TURNS]
    if builder.system_prompt == template_system_prompt(tokenizer):
        probes.append((("user", _PROBE_USER),))  # the default system turn too, unless configured away
    for turns in probes:
        rendered = render_template(tokenizer, turns)
        if rendered is None:
            return "the chat template cannot render a text-only conversation"
        messages = tuple(ChatMessage(role, (TextPart(text),)) for role, text in turns)
        ours = builder.build(messages, []).token_ids
        if ours != tokenizer(rendered, add_special_tokens=False)["input_ids"]:
            return f"the chat template renders {rendered!r}, DvD {tokenizer.decode(ours)!r}"
    return None
