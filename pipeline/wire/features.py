"""Vision features: a serialized FeatureHeader plus a raw payload frame.

`decode_features` checks every header field against the payload before a tensor is built from it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from google.protobuf.message import DecodeError

from pipeline.errors import DeadlineExceeded, InternalError, InvalidRequest, ResourceExhausted
from pipeline.wire.jobs import JobStatus, WireError
from proto.dvd.v1 import vision_pb2 as pb

_DTYPES: dict[int, torch.dtype] = {
    pb.TENSOR_DTYPE_BFLOAT16: torch.bfloat16,
    pb.TENSOR_DTYPE_FLOAT16: torch.float16,
    pb.TENSOR_DTYPE_FLOAT32: torch.float32,
}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


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


class HeaderError(WireError):
    """A header that names its job but cannot be used: that job fails at once (its requester need not
    wait out its timeout)."""

    def __init__(self, message: str, job_id: str, server_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.server_id = server_id


def decode_header(data: bytes) -> FeatureHeader:
    """Parse a FeatureHeader. Raises WireError, or HeaderError when the header names its job."""
    msg = pb.FeatureHeader()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"undecodable FeatureHeader: {exc}") from None
    if not msg.job_id:
        raise WireError("FeatureHeader without job_id")
    if msg.status == pb.JOB_STATUS_UNSPECIFIED:
        raise HeaderError(f"FeatureHeader for job {msg.job_id!r} has no status", msg.job_id, msg.server_id)
    return FeatureHeader.from_pb(msg)


def decode_features(
    header: FeatureHeader, payload: memoryview | bytes, keepalive: Any = None, hidden_size: int | None = None
) -> Features:
    """Validate a header against its payload and view the payload as a [rows, hidden] tensor (whose
    values must all be finite)."""
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
    if not torch.isfinite(tensor).all():
        raise WireError(f"features for job {header.job_id!r} hold NaN or infinite values")
    return Features(header=header, tensor=tensor, keepalive=keepalive, received_unix_s=time.time())
