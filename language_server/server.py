"""The language server process: LLM, engine thread, vision client, the gRPC API and the
OpenAI-compatible HTTP API."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable

import grpc
from transformers import AutoTokenizer

from language_server import metrics
from language_server.api import GenerationService
from language_server.engines import start_engine
from language_server.http_api import HttpApi, create_app
from language_server.media_preparer import LocalVision, MediaPreparer
from language_server.prompt import PromptBuilder, template_mismatch
from language_server.remote_media import RemoteMedia
from language_server.vision_client import VisionClient
from pipeline.model.checkpoint import Checkpoint, CheckpointError, open_model
from pipeline.config import DvDConfig
from pipeline.runtime.logs import setup_logging
from pipeline.runtime.process import configure_torch, start_metrics
from pipeline.stages import Pipeline
from pipeline.runtime.grpc_server import (
    NOT_SERVING,
    SERVING,
    parameter_bytes,
    ApiKeyInterceptor,
    AsyncAdminService,
    ErrorInterceptor,
    add_health_and_reflection,
    server_info,
    server_options,
)
from pipeline.runtime.tls import TlsError, server_credentials, tls_mode
from proto.dvd.v1 import admin_pb2_grpc, generate_pb2_grpc

log = logging.getLogger(__name__)


def stop_token_ids(checkpoint: Checkpoint, tokenizer) -> tuple[int, ...]:
    """End-of-turn ids: <|im_end|>, the tokenizer's eos and generation_config's eos ids."""
    ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    generation_config = checkpoint.path / "generation_config.json"
    if generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(i for i in ids if isinstance(i, int)))


def load_tokenizer(checkpoint: Checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    context_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if context_id != checkpoint.internvl_config.image_token_id:
        raise CheckpointError(
            f"{checkpoint.path}: tokenizer's <IMG_CONTEXT> is {context_id}, "
            f"config's image token id is {checkpoint.internvl_config.image_token_id}"
        )
    return tokenizer


async def serve(
    config: DvDConfig,
    stop: asyncio.Event,
    credentials: grpc.ServerCredentials | None = None,
    local_vision: LocalVision | None = None,
) -> None:
    """Load the LLM, start the engine and the API, and serve until `stop` is set.

    With `local_vision` (the colocated baseline) images are encoded in this process, inline on
    the engine thread, instead of by vision servers.
    """
    lc = config.language
    checkpoint = open_model(config.model.path, config.model.format)
    tokenizer = load_tokenizer(checkpoint)
    # The feature port is bound before the engine starts: vLLM's processes bind ports of their own.
    vision = VisionClient(config, checkpoint.text_config.hidden_size) if local_vision is None else None
    try:
        engine = await start_engine(config, checkpoint, tokenizer)
    except BaseException:
        if vision is not None:
            vision.close()
        raise
    metrics.watch_engine(engine.stats)

    interceptors = [ErrorInterceptor()]
    if lc.api_key:
        interceptors.insert(0, ApiKeyInterceptor(lc.api_key))
    server = grpc.aio.server(interceptors=interceptors, options=server_options(lc.max_request_bytes))
    pipeline = Pipeline.create(lc.max_pending_requests, lc.max_vision_requests, lc.max_llm_requests)
    prompts = PromptBuilder(tokenizer, lc.system_prompt)
    _ = prompts.max_chars_per_token  # scans the vocabulary once, before any request waits on it
    mismatch = template_mismatch(prompts)
    if mismatch is not None:
        log.warning(
            "prompts follow the internvl2_5 layout, which differs from this checkpoint's chat template",
            extra={"difference": mismatch, "checkpoint": str(checkpoint.path)},
        )
    loaded, param_bytes = engine.loaded, engine.parameter_bytes
    if vision is not None:
        media: MediaPreparer = RemoteMedia(vision, prompts, config, pipeline, group_images=checkpoint.is_flash)
        role = "language"
    else:
        media = local_vision.media_preparer(prompts, pipeline)
        role = "colocated"
        loaded = sorted(loaded + local_vision.loaded_tensors)
        param_bytes += parameter_bytes(local_vision.modules)
    service = GenerationService(
        config, checkpoint, engine.api, media, pipeline, stop_token_ids(checkpoint, tokenizer)
    )
    generate_pb2_grpc.add_GenerationServicer_to_server(service, server)
    info = server_info(role, checkpoint, lc.dtype, lc.device, loaded, param_bytes)
    admin_pb2_grpc.add_AdminServicer_to_server(AsyncAdminService(info), server)
    health = add_health_and_reflection(server, ["dvd.v1.Generation", "dvd.v1.Admin"], aio=True)
    address = f"{lc.host}:{lc.grpc_port}"
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if not bound:
        raise RuntimeError(f"cannot bind the gRPC API to {address}")
    await server.start()
    http: HttpApi | None = None
    try:
        if lc.http_port:
            http = HttpApi(create_app(service, tokenizer), lc)
            await http.start()
        await health.set("", SERVING)
        await health.set("dvd.v1.Generation", SERVING)
        ready = {
            "address": address, "mode": config.mode, "engine": lc.engine, "system_prompt": prompts.system_prompt,
            "tls": tls_mode(lc), "http": f"{lc.host}:{lc.http_port}" if lc.http_port else "off",
        }
        log.info(f"{role} server ready", extra=ready)
        await stop.wait()
    finally:
        await health.set("", NOT_SERVING)
        if http is not None:
            await http.stop()
        await server.stop(grace=5.0)
        engine.stop()
        for part in (vision, local_vision):
            if part is not None:
                part.close()


def run_until_signalled(
    config: DvDConfig, role: str, make_local_vision: Callable[[], LocalVision] | None = None
) -> None:
    """The process's main: logging, torch threads and /metrics, then `serve` until SIGTERM or SIGINT."""
    setup_logging(role, config.log_level)
    try:
        credentials = server_credentials(config.language)  # a bad certificate stops start-up before anything loads
    except TlsError as exc:
        log.error(str(exc))
        raise SystemExit(2) from None
    configure_torch(config.language.threads, config.language.cpus)
    start_metrics(config.language.host, config.language.metrics_port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop, credentials, None if make_local_vision is None else make_local_vision())

    asyncio.run(main())
