"""What turns a validated request into the engine's request: `RemoteMedia` (vision servers,
language_server/remote_media.py) or, in the colocated baseline, the vision half inside this
process (pipeline/entrypoints/colocated.py)."""

from __future__ import annotations

from typing import Protocol

import torch

from language_server.engine.sampling import SamplingParams
from language_server.engine.sequence import EngineRequest
from language_server.media_trace import MediaTrace
from language_server.prompt import PromptBuilder
from language_server.request import GenerationRequest
from pipeline.stages import Pipeline


class MediaPreparer(Protocol):
    """Makes the engine request for a validated generation request."""

    async def engine_request(
        self, req: GenerationRequest, params: SamplingParams
    ) -> tuple[EngineRequest, MediaTrace]: ...


class LocalVision(Protocol):
    """A vision half inside the language server's process (the colocated baseline)."""

    loaded_tensors: list[str]
    modules: list[torch.nn.Module]

    def media_preparer(self, prompts: PromptBuilder, pipeline: Pipeline) -> MediaPreparer: ...

    def close(self) -> None: ...
