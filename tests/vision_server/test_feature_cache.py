"""vision_server.feature_cache: keys, LRU eviction under the byte budget, hit and miss counts."""

from __future__ import annotations

import torch
from prometheus_client import REGISTRY

from pipeline.wire import VisionJob
from vision_server.feature_cache import CachedFeatures, FeatureCache, cache_key


def entry(rows: int) -> CachedFeatures:
    return CachedFeatures(tile_tokens=(rows,), frame_tiles=(), rows=torch.zeros(rows, 4))  # rows x 16 bytes


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_keys_depend_on_bytes_and_on_every_shaping_parameter():
    job = VisionJob("a", "r", "image", b"same bytes", "x")
    base = cache_key(job, "router")
    assert cache_key(VisionJob("b", "other", "image", b"same bytes", "y"), "router") == base  # ids do not matter
    variants = [
        VisionJob("a", "r", "image", b"other bytes", "x"),
        VisionJob("a", "r", "image", b"same bytes", "x", max_tiles=6),
        VisionJob("a", "r", "image", b"same bytes", "x", min_tiles=2),
        VisionJob("a", "r", "image", b"same bytes", "x", use_thumbnail=False),
        VisionJob("a", "r", "video", b"same bytes", "x"),
    ]
    keys = {cache_key(v, "router") for v in variants} | {cache_key(job, "all_64")}
    assert base not in keys and len(keys) == len(variants) + 1
    video = VisionJob("v", "r", "video", b"clip", "x", num_segments=8)
    assert cache_key(video, "router") != cache_key(VisionJob("v", "r", "video", b"clip", "x", num_segments=4), "router")
    assert cache_key(video, "router") != cache_key(VisionJob("v", "r", "video", b"clip", "x", start_s=1.0), "router")


def test_lru_eviction_keeps_within_the_byte_budget():
    cache = FeatureCache(capacity_bytes=100 * 16)
    cache.put("a", entry(40))
    cache.put("b", entry(40))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", entry(40))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 80 * 16 <= cache.capacity_bytes
    cache.put("huge", entry(101))  # larger than the whole budget: not stored, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2


def test_hits_and_misses_are_counted_and_a_zero_budget_disables_the_cache():
    hits, misses = counter("dvd_vision_cache_hits_total"), counter("dvd_vision_cache_misses_total")
    cache = FeatureCache(capacity_bytes=1 << 20)
    cache.get("k")
    cache.put("k", entry(4))
    cache.get("k")
    cache.get("k")
    assert counter("dvd_vision_cache_hits_total") - hits == 2
    assert counter("dvd_vision_cache_misses_total") - misses == 1
    off = FeatureCache(capacity_bytes=0)
    off.put("k", entry(4))
    assert not off.enabled and off.get("k") is None and len(off) == 0
