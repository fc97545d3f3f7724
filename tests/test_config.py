"""YAML -> frozen dataclasses: every example config loads; wrong keys and values name themselves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, DvDConfig, config_from_dict, load_config, parse_override, to_dict

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads(path):
    config = load_config(path)
    assert isinstance(config, DvDConfig)
    assert config.source == str(path)


def test_every_key_is_documented_in_tiny_yaml():
    raw = yaml.safe_load((CONFIGS[0].parent / "tiny.yaml").read_text())
    assert to_dict(config_from_dict(raw)).keys() == raw.keys()
    for section, values in to_dict(DvDConfig()).items():
        if isinstance(values, dict):
            assert set(raw[section]) == set(values), section


def test_configs_are_frozen():
    config = DvDConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.vision.threads = 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"vision.max_batch_tile": 8}, "unknown key 'vision.max_batch_tile'"),
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"language.grpc_port": "abc"}, "language.grpc_port: expected an integer"),
        ({"language.grpc_port": 70000}, "language.grpc_port: not a TCP port"),
        ({"vision.dtype": "float64"}, "vision.dtype: 'float64' is not one of"),
        ({"images.max_tiles": 0}, "images.max_tiles: must be > 0"),
        ({"images.min_tiles": 5, "images.max_tiles": 4}, "images.min_tiles (5) exceeds max_tiles (4)"),
        ({"language.vision_servers": ["nohost"]}, "language.vision_servers: expected host:port"),
        ({"transport.backend": "carrier-pigeon"}, "transport.backend: unknown backend 'carrier-pigeon'"),
        ({"model.path": "https://huggingface.co/OpenGVLab/InternVL3_5-1B"}, "model.path: must be a local directory"),
        ({"images.use_thumbnail": "yes"}, "images.use_thumbnail: expected true or false"),
        ({"vision": 3}, "vision: expected a mapping"),
    ],
)
def test_bad_values_stop_loading_with_the_key_and_the_file(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS[0].parent / "tiny.yaml", override)
    assert message in str(info.value)
    assert "tiny.yaml" in str(info.value)


def test_overrides_parse_yaml_values():
    assert parse_override("language.grpc_port=50052") == ("language.grpc_port", 50052)
    assert parse_override("language.vision_servers=[a:1, b:2]") == ("language.vision_servers", ["a:1", "b:2"])
    config = load_config(CONFIGS[0].parent / "tiny.yaml", dict([parse_override("vision.threads=2")]))
    assert config.vision.threads == 2
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
