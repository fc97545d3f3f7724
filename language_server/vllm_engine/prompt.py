"""A DvD prompt, with its image features, in the form vLLM's InternVL models take.

DvD's prompt holds each image (or video frame) as `<img>` + N x `<IMG_CONTEXT>` + `</img>`, N being
the rows the vision server sent for it (ViR makes N differ between tiles). vLLM's InternVL models
take one placeholder per image (`<IMG_CONTEXT>` on HF-format checkpoints, the text `<image>` on
original ones) with that image's embeddings, `image_embeds` of N rows, and expand the placeholder
to the same `<img>` + N x `<IMG_CONTEXT>` + `</img>`. So each block becomes one placeholder and
one view of the feature rows: vLLM rebuilds exactly DvD's prompt, and no feature row is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import InternalError, InvalidRequest


@dataclass(frozen=True)
class ImageTokens:
    """The token ids an image block is made of, and the placeholder vLLM expands into one."""

    start: int  # <img>
    context: int  # <IMG_CONTEXT>
    end: int  # </img>
    placeholder: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer, checkpoint_format: str) -> ImageTokens:
        start, context, end = tokenizer.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
        if checkpoint_format == "hf":
            placeholder = (context,)
        else:
            placeholder = tuple(tokenizer.encode("<image>", add_special_tokens=False))
        return cls(start, context, end, placeholder)


def vllm_prompt(prompt_ids: list[int], rows: torch.Tensor | None, tokens: ImageTokens) -> dict:
    """vLLM's prompt for `prompt_ids` with `rows` at its `<IMG_CONTEXT>` positions, in order."""
    if rows is None or rows.shape[0] == 0:
        return {"prompt_token_ids": list(prompt_ids)}
    compact: list[int] = []
    embeds: list[torch.Tensor] = []
    row = i = 0
    while i < len(prompt_ids):
        token = prompt_ids[i]
        if token == tokens.start and i + 1 < len(prompt_ids) and prompt_ids[i + 1] == tokens.context:
            end = i + 1
            while end < len(prompt_ids) and prompt_ids[end] == tokens.context:
                end += 1
            if end == len(prompt_ids) or prompt_ids[end] != tokens.end:
                raise InternalError("an image block of the prompt is not closed by </img>")
            count = end - i - 1
            embeds.append(rows[row : row + count])
            row += count
            compact.extend(tokens.placeholder)
            i = end + 1
            continue
        compact.append(token)
        i += 1
    if row != rows.shape[0]:
        raise InternalError(f"the prompt has {row} image placeholder tokens for {rows.shape[0]} feature rows")
    if _occurrences(compact, tokens.placeholder) != len(embeds):
        raise InvalidRequest(
            "the text contains the image placeholder that vLLM's InternVL model expands "
            "(<image> on original-format checkpoints); remove it or use language.engine: builtin"
        )
    return {"prompt_token_ids": compact, "multi_modal_data": {"image": embeds}}


def _occurrences(ids: list[int], pattern: tuple[int, ...]) -> int:
    n, count, i = len(pattern), 0, 0
    while i + n <= len(ids):
        if tuple(ids[i : i + n]) == pattern:
            count, i = count + 1, i + n
        else:
            i += 1
    return count
