"""A small Python client for the public API (used by the CLI, tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc

from pipeline.runtime.tls import channel_credentials
from proto.dvd.v1 import generate_pb2 as pb
from proto.dvd.v1 import generate_pb2_grpc

ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}


def image(data: bytes | str | Path, max_tiles: int = 0) -> pb.ContentPart:
    """An image content part from bytes or a file path."""
    if not isinstance(data, bytes):
        data = Path(data).read_bytes()
    return pb.ContentPart(image=pb.ImageInput(data=data, max_tiles=max_tiles))


def video(data: bytes | str | Path, num_segments: int = 0, max_tiles_per_frame: int = 0) -> pb.ContentPart:
    """A video content part from bytes or a file path."""
    if not isinstance(data, bytes):
        data = Path(data).read_bytes()
    return pb.ContentPart(
        video=pb.VideoInput(data=data, num_segments=num_segments, max_tiles_per_frame=max_tiles_per_frame)
    )


def message(role: str, *parts: str | pb.ContentPart) -> pb.Message:
    """A chat turn; strings become text parts."""
    content = [pb.ContentPart(text=p) if isinstance(p, str) else p for p in parts]
    return pb.Message(role=ROLES[role], content=content)


def sampling(**kwargs) -> pb.SamplingParameters:
    """SamplingParameters from keyword arguments (max_new_tokens=..., temperature=..., stop=[...])."""
    return pb.SamplingParameters(**kwargs)


class DvDClient:
    """Blocking client of dvd.v1.Generation. TLS when `tls` is set or any of `tls_ca`, `tls_cert`,
    `tls_key` (PEM file paths) is given: the server's certificate must chain to `tls_ca`, or without
    it to the system's roots; mutual TLS with `tls_cert` and `tls_key`."""

    def __init__(
        self,
        address: str,
        api_key: str = "",
        timeout_s: float = 600.0,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls: bool = False,
    ) -> None:
        options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
        if tls or tls_ca or tls_cert or tls_key:
            credentials = channel_credentials(tls_ca, tls_cert, tls_key)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = generate_pb2_grpc.GenerationStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self.timeout_s = timeout_s

    def stream(
        self, messages: list[pb.Message], params: pb.SamplingParameters | None = None, request_id: str = ""
    ) -> Iterator[pb.GenerateResponse]:
        """Server-streamed responses: deltas, then one result."""
        request = pb.GenerateRequest(request_id=request_id, messages=messages, sampling=params)
        return self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)

    def generate(
        self, messages: list[pb.Message], params: pb.SamplingParameters | None = None, request_id: str = ""
    ) -> pb.GenerateResult:
        """The final result only."""
        request = pb.GenerateRequest(request_id=request_id, messages=messages, sampling=params)
        return self.stub.GenerateUnary(request, timeout=self.timeout_s, metadata=self.metadata)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DvDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
