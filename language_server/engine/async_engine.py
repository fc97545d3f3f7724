"""asyncio face of the engine: one async iterator of outputs per request."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from language_server.engine.engine import Engine
from language_server.engine.sequence import EngineOutput, EngineRequest


class AsyncEngine:
    """Submits requests to the engine thread and streams their outputs into the event loop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Yield outputs until the request finishes; leaving early (cancellation) aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()
        handle = self.engine.add_request(request, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.engine.abort(handle)
