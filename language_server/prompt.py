"""Prompt assembly with the `internvl2_5` chat template (Qwen ChatML).

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{parts}<|im_end|>\n ... <|im_start|>assistant\n

An image becomes `<img>` + N x `<IMG_CONTEXT>` + `</img>` + "\n", with N the feature rows the
vision server reported; images are numbered "Image-k: " when a conversation has several.
A video becomes one "Frame{i}: <img>...</img>\n" line per sampled frame.

Text runs between special tokens are tokenized separately, exactly as a tokenizer splits a
rendered template at its special tokens, but with special-token strings inside user text
treated as plain text, so a user cannot forge `<IMG_CONTEXT>` or `<|im_end|>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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

    def __init__(self, tokenizer, system_prompt: str = "") -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
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
        image_count = sum(isinstance(p, ImagePart) for m in messages for p in m.parts)
        pieces: list[str | list[int]] = []
        media = iter(layouts)
        image_index = 0
        for message in messages:
            pieces += [[self.im_start], f"{message.role}\n"]
            for part in message.parts:
                if isinstance(part, TextPart):
                    pieces.append(part.text)
                elif isinstance(part, ImagePart):
                    image_index += 1
                    if image_count > 1:
                        pieces.append(f"Image-{image_index}: ")
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
