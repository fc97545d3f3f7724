"""What the vision side did for one request: its spans, tiles, tokens and bytes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from language_server.prompt import Prompt
from pipeline.stages import Spans
from pipeline.wire import FeatureHeader, Features


@dataclass
class MediaTrace:
    """What the vision side did for one request; filled in once the features exist."""

    spans: Spans = field(default_factory=Spans)
    image_tiles: int = 0
    image_tokens: int = 0
    payload_bytes: int = 0
    prepare_s: float = 0.0  # time the engine thread spent preparing (colocated only)

    feeder: asyncio.Task | None = None  # receives the parts of answers that come after the first

    def record(self, headers: list[FeatureHeader], prompt: Prompt) -> None:
        self.image_tiles = sum(len(h.tile_tokens) for h in headers)
        self.image_tokens = prompt.image_tokens
        self.payload_bytes = sum(h.payload_bytes for h in headers)

    def add_vision_times(self, features: Features) -> None:
        """Count a job's compute and transfer times from one of its answer's parts (the last, when
        there are several): the request's spans are the slowest job's."""
        timings = features.header.timings
        self.spans.vision_compute = max(self.spans.vision_compute, (timings.preprocess_ms + timings.compute_ms) / 1000)
        self.spans.transfer = max(self.spans.transfer, transfer_s(features))

    def cancel(self) -> None:
        """Stop receiving features (the request ended)."""
        if self.feeder is not None and not self.feeder.done():
            self.feeder.cancel()


def transfer_s(features: Features) -> float:
    """Seconds from the vision server handing the payload to the transport to the receiver holding it."""
    return max(0.0, features.received_unix_s - features.header.timings.sent_unix_s)
