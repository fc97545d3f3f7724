"""Prometheus metrics of a vision server."""

from prometheus_client import Counter, Gauge, Histogram

_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
_TILES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

JOBS = Counter("dvd_vision_jobs_total", "Vision jobs handled, by outcome", ["status"])
TILES = Counter("dvd_vision_tiles_total", "Tiles encoded by the ViT")
QUEUE_DEPTH = Gauge("dvd_vision_queue_depth", "Jobs admitted whose answer is not computed yet")
QUEUE_MS = Histogram("dvd_vision_queue_ms", "Time a job waited for preprocessing and for its batch (ms)", buckets=_MS)
PREPROCESS_MS = Histogram("dvd_vision_preprocess_ms", "Decode and tiling time per job (ms)", buckets=_MS)
ENCODE_MS = Histogram("dvd_vision_encode_ms", "ViT, ViR and projector time per batch (ms)", buckets=_MS)
BATCH_TILES = Histogram("dvd_vision_batch_tiles", "Tiles per encoder batch", buckets=_TILES)
BATCH_JOBS = Histogram("dvd_vision_batch_jobs", "Jobs per encoder batch", buckets=_TILES)
BYTES_SENT = Counter("dvd_vision_bytes_sent_total", "Feature payload bytes handed to the transport")
SEND_MS = Histogram("dvd_vision_send_ms", "Time to hand one payload to the transport (ms)", buckets=_MS)
CACHE_HITS = Counter("dvd_vision_cache_hits_total", "Jobs answered from the feature cache")
CACHE_MISSES = Counter("dvd_vision_cache_misses_total", "Jobs looked up in the feature cache and not found")
CACHE_BYTES = Gauge("dvd_vision_cache_bytes", "Feature bytes held by the cache")
VIR_TILES = Counter("dvd_vision_vir_tiles_total", "Tiles sent, by tokens per tile (256, or 64 when compressed)", ["tokens"])
VIR_RATIO = Histogram(
    "dvd_vision_vir_compression_ratio",
    "Feature rows sent per job divided by the rows without compression (256 per tile)",
    buckets=(0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0),
)
