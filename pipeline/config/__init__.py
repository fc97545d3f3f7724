"""Deployment configuration: one YAML file -> frozen dataclasses (see configs/tiny.yaml for every key)."""

from pipeline.config.deployment import DvDConfig, config_from_dict, load_config, parse_override, to_dict
from pipeline.config.fields import ConfigError
from pipeline.config.sections import (
    DType,
    ImageLimits,
    LanguageConfig,
    ModelConfig,
    TransportConfig,
    VideoLimits,
    VisionConfig,
)
from pipeline.config.vllm import VllmEngineConfig

__all__ = [
    "ConfigError",
    "DType",
    "DvDConfig",
    "ImageLimits",
    "LanguageConfig",
    "ModelConfig",
    "TransportConfig",
    "VideoLimits",
    "VisionConfig",
    "VllmEngineConfig",
    "config_from_dict",
    "load_config",
    "parse_override",
    "to_dict",
]
