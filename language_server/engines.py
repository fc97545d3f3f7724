"""The language server's engine, builtin or vLLM's, behind one face."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from language_server.engine.async_engine import AsyncEngine
from language_server.engine.attention import unsupported_features
from language_server.engine.engine import Engine
from language_server.model import LanguageModel
from pipeline.config import DvDConfig
from pipeline.model.checkpoint import Checkpoint, CheckpointError
from pipeline.runtime.grpc_server import parameter_bytes


@dataclass
class RunningEngine:
    """A started engine: what the API streams from, what /metrics reads, and what it loaded."""

    api: Any  # has `generate(EngineRequest)`: AsyncEngine or VllmEngine
    stats: Any  # what metrics.watch_engine reads: Engine or VllmEngine
    loaded: list[str]  # tensor or parameter names the engine holds
    parameter_bytes: int
    stop: Callable[[], None]


async def start_engine(config: DvDConfig, checkpoint: Checkpoint, tokenizer) -> RunningEngine:  # noqa: ANN001
    """Load the language model into the engine `language.engine` names, and start it."""
    lc = config.language
    if lc.engine == "vllm":
        from language_server.vllm_engine.engine import VllmEngine

        engine = VllmEngine.start(config, checkpoint, tokenizer)
        parameters = await engine.parameters()
        return RunningEngine(
            engine, engine, sorted(name for name, _ in parameters), sum(n for _, n in parameters),
            engine.stop,
        )
    refuse_unsupported(checkpoint)
    model, loaded = LanguageModel.from_checkpoint(checkpoint, lc.device, getattr(torch, lc.dtype))
    engine = Engine(model, tokenizer, lc)
    engine.start()
    return RunningEngine(AsyncEngine(engine), engine, loaded, parameter_bytes([model]), engine.stop)


def refuse_unsupported(checkpoint: Checkpoint) -> None:
    """Stop start-up, before anything loads, when the builtin engine cannot serve this LLM."""
    missing = unsupported_features(checkpoint.text_config)
    if missing:
        family = getattr(checkpoint.text_config, "model_type", "this")
        raise CheckpointError(
            f"{checkpoint.path}: the builtin engine cannot serve a {family} LLM ({' and '.join(missing)} are not "
            "supported); serve this model with language.engine: vllm"
        )
