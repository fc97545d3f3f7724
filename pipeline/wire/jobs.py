"""Vision jobs: what the language server asks a vision server to encode, as one serialized protobuf."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from google.protobuf.message import DecodeError

from proto.dvd.v1 import vision_pb2 as pb

MediaKind = Literal["image", "video"]
VirMode = Literal["config", "router", "all_256", "all_64"]


class WireError(ValueError):
    """A received message is malformed or inconsistent with its payload."""


_KINDS = {"image": pb.MEDIA_KIND_IMAGE, "video": pb.MEDIA_KIND_VIDEO}
_VIR = {
    "config": pb.VIR_MODE_UNSPECIFIED,
    "router": pb.VIR_MODE_ROUTER,
    "all_256": pb.VIR_MODE_ALL_256,
    "all_64": pb.VIR_MODE_ALL_64,
}


class JobStatus:
    """FeatureHeader status codes."""

    OK = pb.JOB_STATUS_OK
    INVALID_INPUT = pb.JOB_STATUS_INVALID_INPUT
    RESOURCE_EXHAUSTED = pb.JOB_STATUS_RESOURCE_EXHAUSTED
    DEADLINE_EXCEEDED = pb.JOB_STATUS_DEADLINE_EXCEEDED
    INTERNAL = pb.JOB_STATUS_INTERNAL

    @staticmethod
    def name(code: int) -> str:
        """"invalid_input" for JOB_STATUS_INVALID_INPUT, and so on."""
        return pb.JobStatus.Name(code).removeprefix("JOB_STATUS_").lower()


@dataclass(frozen=True)
class VisionJob:
    """One image or video for a vision server to encode."""

    job_id: str
    request_id: str
    kind: MediaKind
    data: bytes
    reply_to: str
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    num_segments: int = 8
    start_s: float | None = None
    end_s: float | None = None
    deadline_unix_s: float = 0.0
    sent_unix_s: float = 0.0
    vir_mode: VirMode = "config"
    images: tuple[tuple[bytes, int], ...] = ()  # (data, max_tiles) of each image of a multi-image job

    @property
    def image_items(self) -> tuple[tuple[bytes, int], ...]:
        """The (data, max_tiles) of every image this job carries (one for a single-image job)."""
        return self.images or ((self.data, self.max_tiles),)

    def to_pb(self) -> pb.VisionJob:
        return pb.VisionJob(
            job_id=self.job_id,
            request_id=self.request_id,
            kind=_KINDS[self.kind],
            data=self.data,
            tiling=pb.TilingParameters(
                min_tiles=self.min_tiles, max_tiles=self.max_tiles, use_thumbnail=self.use_thumbnail
            ),
            video=pb.VideoParameters(
                num_segments=self.num_segments,
                start_s=-1.0 if self.start_s is None else self.start_s,
                end_s=-1.0 if self.end_s is None else self.end_s,
            ),
            reply_to=self.reply_to,
            deadline_unix_s=self.deadline_unix_s,
            sent_unix_s=self.sent_unix_s,
            vir_mode=_VIR[self.vir_mode],
            images=[pb.ImageItem(data=data, max_tiles=max_tiles) for data, max_tiles in self.images],
        )

    @classmethod
    def from_pb(cls, msg: pb.VisionJob) -> VisionJob:
        kinds = {code: name for name, code in _KINDS.items()}
        if msg.kind not in kinds:
            raise WireError(f"job {msg.job_id!r}: unknown media kind {msg.kind}")
        if not msg.job_id or not msg.reply_to:
            raise WireError("job without job_id or reply_to")
        if msg.tiling.max_tiles < 1 or msg.tiling.min_tiles < 1 or msg.tiling.min_tiles > msg.tiling.max_tiles:
            raise WireError(f"job {msg.job_id!r}: bad tiling {msg.tiling.min_tiles}..{msg.tiling.max_tiles}")
        if msg.images and (msg.kind != pb.MEDIA_KIND_IMAGE or msg.data):
            raise WireError(f"job {msg.job_id!r}: a multi-image job is an image job without `data`")
        if any(item.max_tiles < msg.tiling.min_tiles for item in msg.images):
            raise WireError(f"job {msg.job_id!r}: an image's max_tiles is below min_tiles")
        modes = {code: name for name, code in _VIR.items()}
        return cls(
            job_id=msg.job_id,
            request_id=msg.request_id,
            kind=kinds[msg.kind],
            data=msg.data,
            reply_to=msg.reply_to,
            min_tiles=msg.tiling.min_tiles,
            max_tiles=msg.tiling.max_tiles,
            use_thumbnail=msg.tiling.use_thumbnail,
            num_segments=msg.video.num_segments,
            start_s=None if msg.video.start_s < 0 else msg.video.start_s,
            end_s=None if msg.video.end_s < 0 else msg.video.end_s,
            deadline_unix_s=msg.deadline_unix_s,
            sent_unix_s=msg.sent_unix_s,
            vir_mode=modes.get(msg.vir_mode, "config"),
            images=tuple((item.data, item.max_tiles) for item in msg.images),
        )

    def encode(self) -> bytes:
        return self.to_pb().SerializeToString()

    @classmethod
    def decode(cls, data: bytes) -> VisionJob:
        msg = pb.VisionJob()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            raise WireError(f"undecodable VisionJob: {exc}") from None
        return cls.from_pb(msg)

    @property
    def expired(self) -> bool:
        return self.deadline_unix_s > 0 and time.time() > self.deadline_unix_s
