"""Generation requests as domain objects, validated on the way in from protobuf."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from language_server.engine.sampling import SamplingParams
from language_server.limits import check_max_new_tokens, check_media_count, check_media_size, check_tile_count
from language_server.tile_estimate import image_tiles, video_tiles
from pipeline.config import DvDConfig
from pipeline.errors import InvalidRequest
from proto.dvd.v1 import generate_pb2 as pb

Role = Literal["system", "user", "assistant"]
_ROLES: dict[int, Role] = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    data: bytes
    max_tiles: int
    tiles: int | None = None  # the tiles it makes, read from its header once; None: unreadable (or not read)


@dataclass(frozen=True)
class VideoPart:
    data: bytes
    num_segments: int
    max_tiles_per_frame: int
    start_s: float | None = None
    end_s: float | None = None


Part = TextPart | ImagePart | VideoPart


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class GenerationRequest:
    """A validated chat request."""

    request_id: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams

    @property
    def media(self) -> list[ImagePart | VideoPart]:
        """Images and videos in prompt order."""
        return media_parts(self.messages)

    @property
    def text_chars(self) -> int:
        """Characters of text in all messages."""
        return sum(len(p.text) for m in self.messages for p in m.parts if isinstance(p, TextPart))

    @classmethod
    def from_pb(cls, request: pb.GenerateRequest, config: DvDConfig) -> GenerationRequest:
        """Validate a GenerateRequest against the server's limits; InvalidRequest names the problem."""
        if not request.messages:
            raise InvalidRequest("messages is empty: send at least one user message")
        messages = tuple(_message(m, i, config) for i, m in enumerate(request.messages))
        for i, message in enumerate(messages):
            if message.role == "system" and i != 0:
                raise InvalidRequest(f"messages[{i}]: a system message may only come first")
        if messages[-1].role != "user":
            raise InvalidRequest("the last message must come from the user")
        media = media_parts(messages)
        check_media_count(len(media), config)
        check_tile_count(sum(_tiles(p, config) for p in media), config)
        sampling = _sampling(request.sampling, config)
        return cls(request_id=request.request_id or uuid.uuid4().hex, messages=messages, sampling=sampling)


def media_parts(messages: tuple[ChatMessage, ...]) -> list[ImagePart | VideoPart]:
    """The images and videos of a conversation, in prompt order."""
    return [p for m in messages for p in m.parts if not isinstance(p, TextPart)]


def _message(message: pb.Message, index: int, config: DvDConfig) -> ChatMessage:
    where = f"messages[{index}]"
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidRequest(f"{where}.role is not set (use ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT)")
    if not message.content:
        raise InvalidRequest(f"{where} has no content")
    parts = tuple(_part(p, f"{where}.content[{j}]", role, config) for j, p in enumerate(message.content))
    return ChatMessage(role=role, parts=parts)


def _part(part: pb.ContentPart, where: str, role: Role, config: DvDConfig) -> Part:
    kind = part.WhichOneof("part")
    limits = config.images
    if kind == "text":
        return TextPart(part.text)
    if kind is None:
        raise InvalidRequest(f"{where} is empty: set text, image or video")
    if role != "user":
        raise InvalidRequest(f"{where}: only user messages may carry images or videos")
    media = part.image if kind == "image" else part.video
    if not media.data:
        raise InvalidRequest(f"{where}: {kind} data is empty")
    if kind == "image":
        check_media_size("image", len(media.data), where, config)
        max_tiles = media.max_tiles or limits.max_tiles
        if not limits.min_tiles <= max_tiles <= limits.max_tiles:
            raise InvalidRequest(f"{where}: max_tiles must be in {limits.min_tiles}..{limits.max_tiles}, got {max_tiles}")
        tiles = image_tiles(media.data, limits.min_tiles, max_tiles, limits.use_thumbnail)
        return ImagePart(data=media.data, max_tiles=max_tiles, tiles=tiles)
    return _video(part.video, where, config)


def _video(video: pb.VideoInput, where: str, config: DvDConfig) -> VideoPart:
    limits = config.video
    check_media_size("video", len(video.data), where, config)
    num_segments = video.num_segments or limits.num_segments
    if not 1 <= num_segments <= limits.max_segments:
        raise InvalidRequest(f"{where}: num_segments must be in 1..{limits.max_segments}, got {num_segments}")
    tiles_per_frame = video.max_tiles_per_frame or limits.tiles_per_frame
    if not 1 <= tiles_per_frame <= limits.max_tiles_per_frame:
        raise InvalidRequest(
            f"{where}: max_tiles_per_frame must be in 1..{limits.max_tiles_per_frame}, got {tiles_per_frame}"
        )
    start_s = video.start_s if video.HasField("start_s") else None
    end_s = video.end_s if video.HasField("end_s") else None
    for name, value in (("start_s", start_s), ("end_s", end_s)):
        if value is not None and not 0 <= value <= limits.max_duration_s:
            raise InvalidRequest(f"{where}: {name} must be in 0..{limits.max_duration_s:g} s, got {value}")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise InvalidRequest(f"{where}: end_s ({end_s}) must be after start_s ({start_s})")
    return VideoPart(
        data=video.data, num_segments=num_segments, max_tiles_per_frame=tiles_per_frame, start_s=start_s, end_s=end_s
    )


def _tiles(part: ImagePart | VideoPart, config: DvDConfig) -> int:
    """Tiles a media part will make (videos: at most); an unreadable image counts one, the vision
    server then reports what is wrong with it."""
    if isinstance(part, VideoPart):
        return video_tiles(part.num_segments, part.max_tiles_per_frame, config.images.use_thumbnail)
    return part.tiles or 1


def _sampling(sampling: pb.SamplingParameters, config: DvDConfig) -> SamplingParams:
    limits = config.language
    max_new = sampling.max_new_tokens if sampling.HasField("max_new_tokens") else limits.default_max_new_tokens
    check_max_new_tokens(max_new, config)
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=sampling.temperature if sampling.HasField("temperature") else 0.0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        top_k=sampling.top_k if sampling.HasField("top_k") else 0,
        repetition_penalty=sampling.repetition_penalty if sampling.HasField("repetition_penalty") else 1.0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
        ignore_eos=sampling.ignore_eos,
        top_logprobs=sampling.top_logprobs,
    )
    try:
        params.validate()
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return params
