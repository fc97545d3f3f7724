"""Messages between language and vision servers: vision jobs one way, features the other."""

from pipeline.wire.features import (
    FeatureHeader,
    Features,
    HeaderError,
    VisionTimings,
    decode_features,
    decode_header,
    encode_features,
    error_header,
    max_feature_bytes,
    validate_header,
)
from pipeline.wire.jobs import JobStatus, MediaKind, VirMode, VisionJob, WireError

__all__ = [
    "FeatureHeader",
    "Features",
    "HeaderError",
    "JobStatus",
    "MediaKind",
    "VirMode",
    "VisionJob",
    "VisionTimings",
    "WireError",
    "decode_features",
    "decode_header",
    "encode_features",
    "error_header",
    "max_feature_bytes",
    "validate_header",
]
