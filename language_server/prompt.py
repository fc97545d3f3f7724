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

A request's text is tokenized once, before its vision answer exists, into a `PromptSkeleton`
(token-id runs around open image blocks; its length with every block empty refuses prompts too
long before any vision work), which the reported rows then fill.

Text runs between special tokens are tokenized separately, exactly as a tokenizer splits a
rendered template at its special tokens, but with special-token strings inside user text
treated as plain text, so a user cannot forge `<IMG_CONTEXT>` or `<|im_end|>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from language_server.limits import check_prompt_length, check_text_length
from language_server.request import ChatMessage, GenerationRequest, ImagePart, TextPart, VideoPart, media_parts


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
        """Token ids of the conversation followed by the assistant's turn opener (each video
        with as many frames as its layout has)."""
        media = media_parts(messages)
        if len(layouts) != len(media):
            raise ValueError(f"{len(layouts)} media layouts for a prompt with {len(media)} images and videos")
        frames = [len(layout.frame_tiles) for part, layout in zip(media, layouts) if isinstance(part, VideoPart)]
        return self.skeleton(messages, frames).fill(layouts)

    def skeleton(self, messages: tuple[ChatMessage, ...], video_frames: list[int] | None = None) -> PromptSkeleton:
        """The conversation's text tokenized (in one tokenizer call) around open image blocks.
        `video_frames`: the frame count of each video in order; None = each VideoPart's num_segments."""
        if self.system_prompt and messages[0].role != "system":
            messages = (ChatMessage("system", (TextPart(self.system_prompt),)), *messages)
        frame_counts = iter(video_frames if video_frames is not None else [])
        pieces: list[str | int | None] = []  # None: an image block
        media: list[int | None] = []
        for message in messages:
            pieces += [self.im_start, f"{message.role}\n"]
            for part in message.parts:
                if isinstance(part, TextPart):
                    pieces.append(part.text)
                elif isinstance(part, ImagePart):
                    pieces += [None, "\n"]
                    media.append(None)
                elif isinstance(part, VideoPart):
                    frames = part.num_segments if video_frames is None else next(frame_counts)
                    for frame in range(1, frames + 1):
                        pieces += [f"Frame{frame}: ", None, "\n"]
                    media.append(frames)
            pieces += [self.im_end, "\n"]
        pieces += [self.im_start, "assistant\n"]
        block = (self.img_start, self.img_context, self.img_end)
        return PromptSkeleton(self._tokenize(pieces), tuple(media), block)

    def _tokenize(self, pieces: list[str | int | None]) -> tuple[tuple[int, ...], ...]:
        """The token-id runs between image blocks. Adjacent strings tokenize as one text, and
        special tokens and image blocks split the text, as a tokenizer splits a rendered template."""
        merged: list[str | int | None] = []
        for piece in pieces:
            if isinstance(piece, str) and merged and isinstance(merged[-1], str):
                merged[-1] += piece
            else:
                merged.append(piece)
        encoded = iter(self._encode_texts([p for p in merged if isinstance(p, str) and p]))
        runs: list[list[int]] = [[]]
        for piece in merged:
            if piece is None:
                runs.append([])
            elif isinstance(piece, int):
                runs[-1].append(piece)
            elif piece:
                runs[-1] += next(encoded)
        return tuple(tuple(run) for run in runs)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@dataclass(frozen=True)
class PromptSkeleton:
    """A prompt tokenized but for its image blocks' `<IMG_CONTEXT>` counts, which only the vision
    answer knows: `runs` are the token ids around the blocks (one more run than blocks), `media`
    each image (None) or video (its frame count) in prompt order, `block` the ids of `<img>`,
    `<IMG_CONTEXT>` and `</img>`."""

    runs: tuple[tuple[int, ...], ...]
    media: tuple[int | None, ...]
    block: tuple[int, int, int]

    @property
    def min_tokens(self) -> int:
        """The prompt's length with every image and frame empty: a lower bound on the filled one."""
        return sum(len(run) for run in self.runs) + 2 * (len(self.runs) - 1)

    def fill(self, layouts: list[MediaLayout]) -> Prompt:
        """The prompt with each image block holding its layout's rows (a video's, its frames')."""
        if len(layouts) != len(self.media):
            raise ValueError(f"{len(layouts)} media layouts for a prompt with {len(self.media)} images and videos")
        rows: list[int] = []
        for frames, layout in zip(self.media, layouts):
            if frames is None:
                rows.append(layout.rows)
            elif len(layout.frame_tiles) != frames:
                raise ValueError(f"a video layout with {len(layout.frame_tiles)} frames for {frames} frame lines")
            else:
                rows += frame_rows(layout)
        start, context, end = self.block
        token_ids = list(self.runs[0])
        for count, run in zip(rows, self.runs[1:]):
            token_ids.append(start)
            token_ids += [context] * count
            token_ids.append(end)
            token_ids += run
        return Prompt(token_ids=token_ids, image_tokens=sum(layout.rows for layout in layouts))


def prepare_prompt(prompts: PromptBuilder, req: GenerationRequest, max_model_len: int) -> PromptSkeleton:
    """The request's text tokenized once, its images and videos left open (`fill_prompt` adds
    them). Before any vision work: InvalidRequest when the prompt leaves no room for one new token
    even with every image and frame empty. Tokenizing long text takes a while: call it off the
    event loop."""
    check_text_length(prompts, req, max_model_len)
    skeleton = prompts.skeleton(req.messages)
    check_prompt_length(skeleton.min_tokens, max_model_len, before_media=bool(req.media))
    return skeleton


def fill_prompt(skeleton: PromptSkeleton, layouts: list[MediaLayout], max_model_len: int) -> Prompt:
    """The prompt with the vision answer's rows; InvalidRequest when it does not leave room for one new token."""
    prompt = skeleton.fill(layouts)
    check_prompt_length(len(prompt.token_ids), max_model_len)
    return prompt


def frame_rows(layout: MediaLayout) -> list[int]:
    """The feature rows of each frame of a video layout."""
    rows, start = [], 0
    for tiles in layout.frame_tiles:
        rows.append(sum(layout.tile_tokens[start : start + tiles]))
        start += tiles
    return rows


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
