"""Messages between language and vision servers, and their validation.

A VisionJob goes language -> vision as one serialized protobuf. Features come back as a
serialized FeatureHeader plus a raw payload frame; `decode_features` checks every field
against the payload before a tensor is built from it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
from google.protobuf.message import DecodeError

from pipeline.errors import DeadlineExceeded, InternalError, InvalidRequest, ResourceExhausted
from proto.dvd.v1 import vision_pb2 as pb

MediaKind = Literal["image", "video"]
VirMode = Literal["config", "router", "all_256", "all_64"]


class WireError(ValueError):
    """A received message is malformed or inconsistent with its payload."""


_DTYPES: dict[int, torch.dtype] = {
    pb.TENSOR_DTYPE_BFLOAT16: torch.bfloat16,
    pb.TENSOR_DTYPE_FLOAT16: torch.float16,
    pb.TENSOR_DTYPE_FLOAT32: torch.float32,
}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}
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

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(len(data) for data, _ in self.images)

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


@dataclass(frozen=True)
class VisionTimings:
    """Vision-side times of one job (milliseconds; sent_unix_s in seconds)."""

    queue_ms: float = 0.0
    preprocess_ms: float = 0.0
    compute_ms: float = 0.0
    sent_unix_s: float = 0.0

    def to_pb(self) -> pb.VisionTimings:
        return pb.VisionTimings(**asdict(self))

    @classmethod
    def from_pb(cls, msg: pb.VisionTimings) -> VisionTimings:
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class FeatureHeader:
    """Describes a feature payload: what job it answers, its dtype and shape, per-tile rows."""

    job_id: str
    request_id: str
    status: int = JobStatus.OK
    error_message: str = ""
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()
    tile_tokens: tuple[int, ...] = ()
    frame_tiles: tuple[int, ...] = ()
    payload_bytes: int = 0
    timings: VisionTimings = field(default_factory=VisionTimings)
    server_id: str = ""
    payload_handle: str = ""
    cached_tiles: int = 0
    row_offset: int = 0  # this part's first row among the job's rows (answers may come in parts)

    @property
    def ok(self) -> bool:
        return self.status == JobStatus.OK

    @property
    def total_rows(self) -> int:
        """Rows of the whole job's answer, over all its parts."""
        return sum(self.tile_tokens)

    @property
    def is_last(self) -> bool:
        """No further part follows: a failure, or the part whose rows reach the job's last row."""
        return not self.ok or self.row_offset + (self.shape[0] if self.shape else 0) >= self.total_rows

    def raise_for_status(self) -> None:
        """Raise the request-ending error that a failed job means for its request."""
        if self.ok:
            return
        message = self.error_message
        if self.status == JobStatus.INVALID_INPUT:
            raise InvalidRequest(message)
        if self.status == JobStatus.RESOURCE_EXHAUSTED:
            raise ResourceExhausted(f"vision server busy: {message}")
        if self.status == JobStatus.DEADLINE_EXCEEDED:
            raise DeadlineExceeded(f"vision job expired: {message}")
        raise InternalError(f"vision server failed: {message}")

    def to_pb(self) -> pb.FeatureHeader:
        return pb.FeatureHeader(
            job_id=self.job_id,
            request_id=self.request_id,
            status=self.status,
            error_message=self.error_message,
            dtype=_DTYPE_CODES.get(self.dtype, pb.TENSOR_DTYPE_UNSPECIFIED) if self.dtype else 0,
            shape=list(self.shape),
            tile_tokens=list(self.tile_tokens),
            frame_tiles=list(self.frame_tiles),
            payload_bytes=self.payload_bytes,
            timings=self.timings.to_pb(),
            server_id=self.server_id,
            payload_handle=self.payload_handle,
            cached_tiles=self.cached_tiles,
            row_offset=self.row_offset,
        )

    @classmethod
    def from_pb(cls, msg: pb.FeatureHeader) -> FeatureHeader:
        return cls(
            job_id=msg.job_id,
            request_id=msg.request_id,
            status=msg.status,
            error_message=msg.error_message,
            dtype=_DTYPES.get(msg.dtype),
            shape=tuple(msg.shape),
            tile_tokens=tuple(msg.tile_tokens),
            frame_tiles=tuple(msg.frame_tiles),
            payload_bytes=msg.payload_bytes,
            timings=VisionTimings.from_pb(msg.timings),
            server_id=msg.server_id,
            payload_handle=msg.payload_handle,
            cached_tiles=msg.cached_tiles,
            row_offset=msg.row_offset,
        )


@dataclass
class Features:
    """A validated answer to a VisionJob: header, and the feature rows when status is OK."""

    header: FeatureHeader
    tensor: torch.Tensor | None  # [rows, hidden]; shares memory with `keepalive`
    keepalive: Any = None
    received_unix_s: float = 0.0

    def release(self) -> None:
        """Done with the rows: let the transport reclaim the payload memory."""
        release = getattr(self.keepalive, "release", None)
        if release is not None:
            release()
        self.keepalive = None
        self.tensor = None


def error_header(job_id: str, request_id: str, status: int, message: str, server_id: str = "") -> FeatureHeader:
    """A header that reports a failed job (no payload)."""
    return FeatureHeader(job_id=job_id, request_id=request_id, status=status, error_message=message, server_id=server_id)


def max_feature_bytes(max_tiles: int, hidden_size: int, tokens_per_tile: int = 256) -> int:
    """The largest feature payload one job can have: every tile of a request at full token
    count, in the widest dtype on the wire (float32). A receiver's frame-size limit."""
    return max_tiles * tokens_per_tile * hidden_size * max(dtype.itemsize for dtype in _DTYPE_CODES)


def encode_features(header: FeatureHeader, tensor: torch.Tensor | None) -> tuple[bytes, memoryview]:
    """Serialize a header and expose the tensor's bytes without copying (CPU, contiguous)."""
    if tensor is None:
        return header.to_pb().SerializeToString(), memoryview(b"")
    if tensor.dim() != 2 or tensor.dtype not in _DTYPE_CODES:
        raise WireError(f"features must be a 2-D bf16/fp16/fp32 tensor, got {tuple(tensor.shape)} {tensor.dtype}")
    tensor = tensor.detach().to("cpu").contiguous()
    payload = tensor.view(torch.uint8).reshape(-1).numpy().data  # a flat view of the tensor's storage
    full = replace(header, dtype=tensor.dtype, shape=tuple(tensor.shape), payload_bytes=payload.nbytes)
    validate_header(full)
    return full.to_pb().SerializeToString(), payload


def validate_header(header: FeatureHeader, hidden_size: int | None = None) -> None:
    """Check the header's internal consistency (and the hidden size, when known)."""
    name = f"features for job {header.job_id!r}"
    if header.dtype is None:
        raise WireError(f"{name}: unknown dtype")
    if len(header.shape) != 2 or min(header.shape) <= 0:
        raise WireError(f"{name}: shape must be [rows, hidden] with both > 0, got {list(header.shape)}")
    rows, hidden = header.shape
    if hidden_size is not None and hidden != hidden_size:
        raise WireError(f"{name}: hidden size {hidden} does not match the model's {hidden_size}")
    expected = math.prod(header.shape) * header.dtype.itemsize
    if header.payload_bytes != expected:
        raise WireError(f"{name}: payload_bytes {header.payload_bytes} != shape {list(header.shape)} x itemsize")
    if not header.tile_tokens or any(t <= 0 for t in header.tile_tokens):
        raise WireError(f"{name}: per-tile token counts must be positive, got {list(header.tile_tokens)}")
    if header.row_offset + rows > header.total_rows:
        raise WireError(
            f"{name}: rows {header.row_offset}..{header.row_offset + rows} lie beyond the "
            f"{header.total_rows} rows its tile token counts sum to"
        )
    if any(t <= 0 for t in header.frame_tiles):
        raise WireError(f"{name}: per-frame tile counts must be positive, got {list(header.frame_tiles)}")
    if header.frame_tiles and sum(header.frame_tiles) != len(header.tile_tokens):
        raise WireError(f"{name}: frame tile counts sum to {sum(header.frame_tiles)}, not {len(header.tile_tokens)}")


def decode_header(data: bytes) -> FeatureHeader:
    msg = pb.FeatureHeader()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"undecodable FeatureHeader: {exc}") from None
    if not msg.job_id:
        raise WireError("FeatureHeader without job_id")
    if msg.status == pb.JOB_STATUS_UNSPECIFIED:
        raise WireError(f"FeatureHeader for job {msg.job_id!r} has no status")
    return FeatureHeader.from_pb(msg)


def decode_features(
    header: FeatureHeader, payload: memoryview | bytes, keepalive: Any = None, hidden_size: int | None = None
) -> Features:
    """Validate a header against its payload and view the payload as a [rows, hidden] tensor."""
    if not header.ok:
        return Features(header=header, tensor=None, received_unix_s=time.time())
    validate_header(header, hidden_size)
    payload = memoryview(payload).cast("B")
    if payload.nbytes != header.payload_bytes:
        raise WireError(
            f"features for job {header.job_id!r}: payload is {payload.nbytes} bytes, header says {header.payload_bytes}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only transport buffers are never written
        tensor = torch.frombuffer(payload, dtype=header.dtype).view(header.shape)
    return Features(header=header, tensor=tensor, keepalive=keepalive, received_unix_s=time.time())
