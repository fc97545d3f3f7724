"""The OpenAI-compatible HTTP API of the language server (FastAPI under uvicorn, in the server's
own event loop).

A chat completion is translated into a dvd.v1 GenerateRequest and run through
GenerationService's own generation path, so admission, pipeline stages, deadlines, metrics and
errors are those of the gRPC API; only the wire format differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from language_server.api import GenerationService
from language_server.media_urls import MediaUrls, read_bounded
from language_server.openai_request import ChatCompletionRequest, to_generate_request
from language_server.openai_response import ResponseBuilder, error_body, sse
from pipeline.errors import (
    DvDError, InternalError, InvalidRequest, ModelNotFound, Unauthenticated, short_message,
)

log = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
                504: "timeout_error"}


def create_app(service: GenerationService, tokenizer: Any) -> FastAPI:
    """The app serving /v1/chat/completions, /v1/models, /health and /metrics."""
    config = service.config
    lc = config.language
    urls = MediaUrls(config)
    started = int(time.time())
    app = FastAPI(title="DvD", docs_url=None, redoc_url=None, openapi_url=None)

    async def api_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if lc.api_key and not secrets.compare_digest(given.encode(), f"Bearer {lc.api_key}".encode()):
            raise Unauthenticated("missing or wrong API key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api_key)])

    @app.exception_handler(DvDError)
    async def dvd_error(request: Request, exc: DvDError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        body = error_body(short_message(str(exc.detail)), _ERROR_TYPES.get(exc.status_code, "error"),
                          str(exc.status_code), None)
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in %s", request.url.path, exc_info=exc)
        return _error(InternalError(f"internal error: {type(exc).__name__}"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(_invalid(exc.errors()))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {"id": service.model_name, "object": "model", "created": started, "owned_by": "dvd",
                "max_model_len": lc.max_model_len}
        return {"object": "list", "data": [card]}

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = await _read_body(request, lc.max_request_bytes)
        try:
            chat = await asyncio.to_thread(ChatCompletionRequest.model_validate_json, body)
        except ValidationError as exc:
            raise _invalid(exc.errors()) from None
        if chat.model != service.model_name:
            raise ModelNotFound(f"model {chat.model!r} is not served here; this server serves {service.model_name!r}",
                                param="model")
        generate = await to_generate_request(chat, urls, tiles_low=config.images.min_tiles)
        top = (chat.top_logprobs or 0) if chat.logprobs else None
        responses = ResponseBuilder(generate.request_id, service.model_name, tokenizer, top)
        if chat.stream:
            include_usage = chat.stream_options is not None and chat.stream_options.include_usage
            return await _stream(service.generate_events(generate), responses, include_usage)
        result = await _until_disconnected(request, service.generate_result(generate))
        if result is None:
            return Response(status_code=499)  # nobody is listening
        return JSONResponse(responses.completion(result))

    app.include_router(v1)
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = f"the request body is over the limit of {limit} bytes (language.max_request_bytes)"
    return await read_bounded(request.stream(), request.headers.get("content-length", ""), limit, too_large)


async def _until_disconnected(request: Request, work: Any) -> Any:
    """Await `work`; None, with `work` cancelled, if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
    if not task.done() or task.cancelled():
        return None
    return task.result()


async def _stream(events: AsyncIterator[Any], responses: ResponseBuilder, include_usage: bool) -> Response:
    """A server-sent-event response. Errors before the first event get their HTTP status; later
    ones end the stream with an error event. Starlette cancels the body when the client leaves,
    which closes `events` and so cancels the request."""
    first = await anext(events)

    async def body() -> AsyncIterator[bytes]:
        async with aclosing(events):
            yield sse(responses.first_chunk())
            try:
                event = first
                while event is not None:
                    if event.HasField("delta"):
                        yield sse(responses.delta_chunk(event.delta))
                    else:
                        yield sse(responses.finish_chunk(event.result))
                        if include_usage:
                            yield sse(responses.usage_chunk(event.result))
                    event = await anext(events, None)
            except DvDError as exc:
                yield sse(_error_json(exc))
            yield sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


def _invalid(errors: list[dict[str, Any]]) -> InvalidRequest:
    """The most specific of pydantic's errors (the deepest; union branch names left out of its path)."""
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    path = [p for p in error.get("loc", ()) if p != "body" and not _union_branch(p)]
    path = [p for i, p in enumerate(path) if i + 1 == len(path) or p != path[i + 1]]  # a tagged union's tag
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    message = "unknown field: this server does not accept it" if error.get("type") == "extra_forbidden" else error.get("msg", "")
    return InvalidRequest(f"{field}: {message}" if field else message, param=field or None)


def _union_branch(part: Any) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _error_json(exc: DvDError) -> dict[str, Any]:
    message = short_message(str(exc)) or type(exc).__name__
    return error_body(message, _ERROR_TYPES.get(exc.http_status, "internal_error"), exc.code.name, exc.param)


def _error(exc: DvDError) -> JSONResponse:
    return JSONResponse(_error_json(exc), status_code=exc.http_status)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the language server's loop handles SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):  # noqa: ANN201
        yield


class HttpApi:
    """The app served by uvicorn as a task of the running loop, on a socket bound up front (so that
    a taken port fails start-up like the gRPC port does)."""

    def __init__(self, app: FastAPI, lc: Any) -> None:
        family = socket.AF_INET6 if ":" in lc.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((lc.host, lc.http_port))
        except OSError as exc:
            self.socket.close()
            raise RuntimeError(f"cannot bind the HTTP API to {lc.host}:{lc.http_port}: {exc.strerror}") from None
        tls = dict(ssl_certfile=lc.tls_cert, ssl_keyfile=lc.tls_key) if lc.tls_cert else {}
        if lc.tls_client_ca:
            tls.update(ssl_ca_certs=lc.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=5, **tls)
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        async with asyncio.timeout(timeout_s):
            while not self.server.started:
                if self.task.done():
                    self.task.result()
                    raise RuntimeError("the HTTP API stopped during start-up")
                await asyncio.sleep(0.01)

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, timeout_s)
        except TimeoutError:
            pass
        finally:
            self.socket.close()
