"""Prometheus metrics of a vision server."""

from prometheus_client import Counter, Gauge, Histogram

_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)

JOBS = Counter("dvd_vision_jobs_total", "Vision jobs handled, by outcome", ["status"])
TILES = Counter("dvd_vision_tiles_total", "Tiles encoded")
QUEUE_DEPTH = Gauge("dvd_vision_queue_depth", "Jobs received and not yet answered")
QUEUE_MS = Histogram("dvd_vision_queue_ms", "Time a job waited before preprocessing (ms)", buckets=_MS)
PREPROCESS_MS = Histogram("dvd_vision_preprocess_ms", "Decode and tiling time per job (ms)", buckets=_MS)
ENCODE_MS = Histogram("dvd_vision_encode_ms", "Encoder time per batch (ms)", buckets=_MS)
BATCH_TILES = Histogram("dvd_vision_batch_tiles", "Tiles per encoder batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BYTES_SENT = Counter("dvd_vision_bytes_sent_total", "Feature payload bytes handed to the transport")
SEND_MS = Histogram("dvd_vision_send_ms", "Time to hand one payload to the transport (ms)", buckets=_MS)
