"""Builds GenerationRequests off the event loop: reading media headers (tile estimates, EXIF)
costs time that grows with the input, so it runs on a small thread pool, within a time budget of
`images.max_decode_s` per image or video, while the loop goes on streaming other requests."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from language_server.request import GenerationRequest
from pipeline.config import DvDConfig
from pipeline.errors import InvalidRequest
from proto.dvd.v1 import generate_pb2 as pb

READER_THREADS = 2


class RequestReader:
    def __init__(self, config: DvDConfig, threads: int = READER_THREADS) -> None:
        self.config = config
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="request-reader")

    async def read(self, request: pb.GenerateRequest) -> GenerationRequest:
        """The validated request; InvalidRequest when it is bad or its media take too long to read."""
        media = sum(part.WhichOneof("part") in ("image", "video") for m in request.messages for part in m.content)
        budget = self.config.images.max_decode_s * max(1, media)
        reading = asyncio.get_running_loop().run_in_executor(self._pool, GenerationRequest.from_pb, request, self.config)
        try:
            return await asyncio.wait_for(reading, budget)
        except TimeoutError:
            raise InvalidRequest(
                f"reading the request's {media} media headers took over {budget:g} s "
                f"(images.max_decode_s: {self.config.images.max_decode_s:g} s each)"
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
