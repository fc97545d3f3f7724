"""An LRU cache of encoded features, keyed by the media bytes and every parameter that shapes them.

A hit skips decoding, the ViT and the projectors: the job is answered with the stored rows.
The cache is bounded by the bytes of the rows it holds; it is safe to use from several threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from pipeline.wire import VisionJob
from vision_server import metrics


@dataclass(frozen=True)
class CachedFeatures:
    """What a job's answer needs besides its ids: the layout and the rows."""

    tile_tokens: tuple[int, ...]
    frame_tiles: tuple[int, ...]
    rows: torch.Tensor  # [sum(tile_tokens), hidden], never written after it is stored

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


def cache_key(job: VisionJob, token_mode: str) -> str:
    """A digest of the media bytes and of the parameters that change the features."""
    digest = hashlib.sha256(job.data)
    for data, max_tiles in job.images:
        digest.update(hashlib.sha256(data).digest() + max_tiles.to_bytes(4, "little"))
    params = (
        job.kind,
        job.min_tiles,
        job.max_tiles,
        job.use_thumbnail,
        token_mode,
        *((job.num_segments, job.start_s, job.end_s) if job.kind == "video" else ()),
    )
    digest.update(repr(params).encode())
    return digest.hexdigest()


class FeatureCache:
    """Least-recently-used features under a byte budget (0 disables the cache)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, CachedFeatures] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedFeatures | None:
        """The entry for `key` (now the most recently used), counting a hit or a miss."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is None:
            metrics.CACHE_MISSES.inc()
        else:
            metrics.CACHE_HITS.inc()
        return entry

    def put(self, key: str, entry: CachedFeatures) -> None:
        """Store an entry, evicting the least recently used ones to stay within the budget."""
        if not self.enabled or entry.nbytes > self.capacity_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
            metrics.CACHE_BYTES.set(self._bytes)
