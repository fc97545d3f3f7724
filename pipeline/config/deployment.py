"""A whole deployment: one YAML file -> a frozen DvDConfig, validated key by key.

An unknown key, a wrong type or a value out of range stops start-up with a ConfigError naming
the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config.fields import ConfigError, build, distinct_ports, loopback, plain, same_host, set_dotted
from pipeline.config.sections import ImageLimits, LanguageConfig, ModelConfig, TransportConfig, VideoLimits, VisionConfig
from pipeline.config.vllm import VllmEngineConfig

@dataclass(frozen=True)
class DvDConfig:
    """A whole deployment: both servers, the model and the transport."""

    mode: Literal["decoupled", "colocated"] = "decoupled"
    model: ModelConfig = field(default_factory=ModelConfig)
    images: ImageLimits = field(default_factory=ImageLimits)
    video: VideoLimits = field(default_factory=VideoLimits)
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    vllm: VllmEngineConfig = field(default_factory=VllmEngineConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    source: str = field(default="<defaults>", compare=False)  # the file it came from

    def check(self) -> None:
        vc, lc = self.vision, self.language
        for key, limit in (("video.max_video_bytes", self.video.max_video_bytes),
                           ("images.max_image_bytes", self.images.max_image_bytes)):
            if limit >= lc.max_request_bytes:
                raise ValueError(
                    f"{key} ({limit}) must be below language.max_request_bytes ({lc.max_request_bytes}), "
                    "the largest request the API accepts"
                )
        if self.mode == "colocated":
            if vc.device_of(0) != lc.device:
                raise ValueError(
                    f"vision.device{'s' if vc.devices else ''} ({vc.device_of(0)}) differs from language.device "
                    f"({lc.device}): colocated mode runs both halves in one process on language.device; set vision.device to it"
                )
            if vc.threads:
                raise ValueError(
                    "vision.threads: colocated mode runs the vision encoder on the language server's threads "
                    "(language.threads); leave vision.threads at 0"
                )
            if vc.cpus:
                raise ValueError(
                    "vision.cpus: colocated mode runs the vision encoder on the language server's CPUs "
                    "(language.cpus); leave vision.cpus empty"
                )
        if lc.engine == "vllm" and lc.threads and not lc.cpus and self.vllm.cpu_threads_bind == "auto":
            raise ValueError(
                "language.threads: vLLM's CPU engine runs one thread per CPU it is bound to; "
                "set language.cpus (or vllm.cpu_threads_bind) instead"
            )
        if self.mode == "decoupled" and self.transport.auth == "none":
            for key, host, port in (("vision.host", vc.host, "job"), ("language.host", lc.host, "feature")):
                if not loopback(host):
                    raise ValueError(
                        f"{key}: {host!r} opens the {port} port beyond this host without authentication; "
                        "set transport.auth: curve (CurveZMQ), or bind internal ports to 127.0.0.1"
                    )
        if self.mode == "decoupled" and not lc.vision_servers and same_host(vc.host, lc.host):
            distinct_ports(
                [(f"vision.{k}", p) for k, p in vc.endpoints()] + [(f"language.{k}", p) for k, p in lc.endpoints()], ""
            )

    @property
    def vision_endpoints(self) -> tuple[str, ...]:
        """The job endpoints the language server sends to."""
        vc = self.vision
        return self.language.vision_servers or tuple(f"{vc.host}:{vc.job_port + i}" for i in range(vc.replicas))


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> DvDConfig:
    """Read a YAML deployment file; `overrides` maps dotted keys ("vision.threads") to values."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> DvDConfig:
    """Build and validate a DvDConfig from plain data."""
    try:
        config = build(DvDConfig, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return dataclasses.replace(config, source=source)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a command-line override "language.grpc_port=50052" (the value is YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value")
    return key.strip(), yaml.safe_load(value)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data form of a config (for YAML dumps and logs)."""
    data = dataclasses.asdict(config)
    data.pop("source", None)
    return plain(data)
