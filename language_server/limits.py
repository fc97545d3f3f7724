"""What the server allows one request, each limit checked by one function here: how many images
and videos, how large each may be, how many tiles they make, how many new tokens, and how long
the prompt (its text in characters before tokenizing, then in tokens).

A leaf module: it reads numbers and the deployment's config, so that request parsing, the HTTP
API, prompt preparation and the engine can all call it.
"""

from __future__ import annotations

from typing import Literal

from pipeline.config import DvDConfig
from pipeline.errors import InvalidRequest, PayloadTooLarge

MediaKind = Literal["image", "video"]


def check_media_count(count: int, config: DvDConfig) -> None:
    """InvalidRequest when a request carries more images and videos than the server allows."""
    limit = config.language.max_images_per_request
    if count > limit:
        raise InvalidRequest(f"{count} images or videos exceed the limit of {limit} per request")


def media_size_limit(kind: MediaKind, config: DvDConfig) -> int:
    """Largest encoded image or video a request may carry, in bytes."""
    return config.images.max_image_bytes if kind == "image" else config.video.max_video_bytes


def check_media_size(kind: MediaKind, size: int, where: str, config: DvDConfig) -> None:
    """PayloadTooLarge when an encoded image or video of `size` bytes is over its limit."""
    limit = media_size_limit(kind, config)
    if size > limit:
        raise PayloadTooLarge(f"{where}: {kind} is {size} bytes, over the limit of {limit}")


def check_tile_count(tiles: int, config: DvDConfig) -> None:
    """InvalidRequest when a request's images and videos make more tiles than one request may have."""
    limit = config.images.max_tiles_per_request
    if tiles > limit:
        raise InvalidRequest(f"the images and videos make {tiles} tiles, over the limit of {limit} tiles per request")


def check_max_new_tokens(max_new_tokens: int, config: DvDConfig) -> None:
    limit = config.language.max_new_tokens_limit
    if max_new_tokens > limit:
        raise InvalidRequest(f"max_new_tokens {max_new_tokens} exceeds the server limit {limit}")


def check_text_length(prompts, req, max_model_len: int) -> None:  # noqa: ANN001 - a PromptBuilder, a GenerationRequest
    """Refuse, without tokenizing, text that cannot fit in max_model_len tokens however it
    tokenizes (no token stands for more than `prompts.max_chars_per_token` characters)."""
    chars = req.text_chars
    limit = max_model_len * prompts.max_chars_per_token
    if chars > limit:
        raise InvalidRequest(
            f"the text is {chars} characters; max_model_len {max_model_len} tokens hold at most {limit}"
        )


def check_prompt_length(tokens: int, max_model_len: int, before_media: bool = False) -> None:
    """InvalidRequest unless a prompt of `tokens` tokens leaves room for one new token.
    `before_media`: `tokens` leaves out the request's images and videos (a lower bound)."""
    if tokens >= max_model_len:
        before = " before its images and videos" if before_media else ""
        raise InvalidRequest(f"the prompt is {tokens} tokens{before}; max_model_len is {max_model_len}")


def new_token_limit(max_new_tokens: int, prompt_tokens: int, max_model_len: int) -> int:
    """The most new tokens a prompt of `prompt_tokens` may get: what was asked, within max_model_len."""
    return min(max_new_tokens, max_model_len - prompt_tokens)
