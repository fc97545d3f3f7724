"""YAML -> frozen dataclasses: every example config loads; wrong keys and values name themselves."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from pipeline.config import fields as config_fields
from pipeline.config import ConfigError, DvDConfig, config_from_dict, load_config, parse_override, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").glob("*.yaml"))


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


def test_tiny_yaml_documents_the_code_defaults():
    """tiny.yaml says it lists every key with its default: the values must be the code's."""
    raw = yaml.safe_load((CONFIGS[0].parent / "tiny.yaml").read_text())
    assert to_dict(config_from_dict(raw)) == to_dict(DvDConfig())


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
        ({"language.host": "0.0.0.0", "language.vision_servers": ["vision-1:5610"]},
         "language.feature_host: host '0.0.0.0' binds every interface"),
        ({"language.feature_host": "0.0.0.0"}, "language.feature_host: must be an address vision servers can reach"),
        ({"vision.host": "0.0.0.0"}, "vision.host: '0.0.0.0' opens the job port beyond this host without authentication; "
                                     "set transport.auth: curve"),
        ({"language.host": "10.1.2.3"}, "language.host: '10.1.2.3' opens the feature port beyond this host"),
        ({"transport.auth": "tls"}, "transport.auth: 'tls' is not one of 'none', 'curve'"),
        ({"model.path": "https://huggingface.co/OpenGVLab/InternVL3_5-1B"}, "model.path: must be a local directory"),
        ({"images.use_thumbnail": "yes"}, "images.use_thumbnail: expected true or false"),
        ({"vision": 3}, "vision: expected a mapping"),
        ({"language.grpc_port": 50061}, "language.grpc_port and vision.grpc_port both use port 50061"),
        ({"language.metrics_port": 9101}, "language.metrics_port and vision.metrics_port both use port 9101"),
        ({"vision.replicas": 2, "vision.job_port": 5610, "vision.grpc_port": 5611},
         "vision.grpc_port and vision.job_port + 1 (replica 1) both use port 5611"),
        ({"language.feature_port": 9100}, "language.metrics_port and language.feature_port both use port 9100"),
        ({"vision.replicas": 3, "vision.grpc_port": 65534}, "vision.grpc_port: replica 2 would use port 65536"),
        ({"vision.job_port": 0}, "vision.job_port: not a TCP port: 0 (0 only switches metrics or the HTTP API off)"),
        ({"language.grpc_port": 0}, "language.grpc_port: not a TCP port: 0"),
        ({"language.feature_port": 0}, "language.feature_port: not a TCP port: 0"),
        ({"language.request_timeout_s": float("nan")}, "language.request_timeout_s: expected a finite number"),
        ({"vision.max_wait_ms": float("inf")}, "vision.max_wait_ms: expected a finite number"),
        ({"transport.send_timeout_s": float("inf")}, "transport.send_timeout_s: expected a finite number"),
        ({"language.num_kv_blocks": 100}, "language.num_kv_blocks: 100 blocks of 16 tokens hold fewer than max_model_len"),
        ({"video.max_video_bytes": 64 * 2**20}, "video.max_video_bytes (67108864) must be below language.max_request_bytes"),
        ({"images.max_image_bytes": 2**20, "video.max_video_bytes": 1000, "language.max_request_bytes": 2**20},
         "images.max_image_bytes (1048576) must be below language.max_request_bytes"),
        ({"transport.payload_timeout_s": 10.0}, "transport.payload_timeout_s (10) is shorter than send_timeout_s (30)"),
        ({"transport.rdma_plugin": "UCX LIBFABRIC"}, "transport.rdma_plugin: must name a NIXL backend plugin"),
        ({"transport.rdma_plugin": ""}, "transport.rdma_plugin: must name a NIXL backend plugin"),
        ({"mode": "colocated", "vision.device": "cuda:1", "language.device": "cuda:0"},
         "vision.device (cuda:1) differs from language.device (cuda:0)"),
        ({"mode": "colocated", "vision.devices": ["cuda:1"]}, "vision.devices (cuda:1) differs from language.device (cpu)"),
        ({"mode": "colocated", "vision.threads": 2}, "vision.threads: colocated mode runs the vision encoder"),
        ({"mode": "colocated", "vision.cpus": [0]}, "vision.cpus: colocated mode runs the vision encoder"),
        ({"vision.cpus": [0, 0]}, "vision.cpus: CPU ids must be distinct and >= 0, got [0, 0]"),
        ({"language.cpus": [-1]}, "language.cpus: CPU ids must be distinct and >= 0"),
        ({"vision.cpus": [0, 1, 2], "vision.replicas": 2}, "vision.cpus: 3 CPUs do not split evenly between 2 replicas"),
        ({"language.cpus": [0], "language.threads": 2}, "language.threads (2) exceeds the 1 CPUs in cpus"),
        ({"vision.cpus": [0, 1], "vision.replicas": 2, "vision.threads": 2}, "exceeds the 1 CPUs in cpus per replica"),
        ({"language.engine": "tgi"}, "language.engine: 'tgi' is not one of"),
        ({"language.http_port": 50051}, "language.http_port and language.grpc_port both use port 50051"),
        ({"language.http_port": 9101}, "language.http_port and vision.metrics_port both use port 9101"),
        ({"language.http_port": 65536}, "language.http_port: not a TCP port"),
        ({"language.allowed_media_dirs": ["relative/dir"]}, "language.allowed_media_dirs[0]: must be an absolute"),
        ({"language.allowed_media_dirs": ["/no/such/dvd/dir"]}, "language.allowed_media_dirs[0]: no such directory"),
        ({"language.allowed_media_dirs": "/tmp"}, "language.allowed_media_dirs: expected a list"),
        ({"language.fetch_remote_media": "yes"}, "language.fetch_remote_media: expected true or false"),
        ({"language.remote_media_max_bytes": 0}, "language.remote_media_max_bytes: must be > 0"),
        ({"language.remote_media_timeout_s": -1}, "language.remote_media_timeout_s: must be > 0"),
        ({"vllm.tensor_parallel_size": 0}, "vllm.tensor_parallel_size: must be > 0"),
        ({"vllm.distributed_executor_backend": "slurm"}, "vllm.distributed_executor_backend: 'slurm' is not one of"),
        ({"vllm.gpu_memory_utilization": 1.5}, "vllm.gpu_memory_utilization must be <= 1"),
        ({"vllm.cpu_kv_cache_gib": 0}, "vllm.cpu_kv_cache_gib: must be > 0"),
        ({"vllm.cpu_threads_bind": "all"}, "vllm.cpu_threads_bind: expected auto, nobind or a CPU list"),
        ({"vllm.enforce_eager": "sometimes"}, "vllm.enforce_eager: expected true or false"),
        ({"language.engine": "vllm", "language.threads": 2},
         "language.threads: vLLM's CPU engine runs one thread per CPU it is bound to"),
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


@pytest.mark.parametrize(
    "override",
    [
        {"vision.metrics_port": 0, "language.metrics_port": 0},  # 0 switches metrics off, on both
        {"language.http_port": 0, "language.grpc_port": 8000},  # the HTTP API off frees its port
        {"vision.replicas": 2, "vision.job_port": 5610, "vision.grpc_port": 5612, "vision.metrics_port": 5614},
        {"language.grpc_port": 50061, "language.host": "10.0.0.2", "transport.auth": "curve"},  # vision on another host
        {"language.grpc_port": 50061, "language.vision_servers": ["vision-host:5610"]},  # no local vision server
        {"mode": "colocated", "vision.job_port": 50051},  # colocated binds no vision port
        {"language.num_kv_blocks": 512},  # 512 x 16 = max_model_len
        {"mode": "colocated", "vision.device": "cuda:0", "language.device": "cuda:0"},
        {"vision.cpus": [0, 1], "language.cpus": [2, 3], "vision.threads": 2},
        {"language.engine": "vllm", "language.cpus": [1], "vllm.cpu_threads_bind": "auto"},
        {"language.engine": "vllm", "vllm.cpu_threads_bind": "0-3,6", "vllm.tensor_parallel_size": 4},
    ],
)
def test_consistent_values_load(override):
    load_config(CONFIGS[0].parent / "tiny.yaml", override)


def test_vision_replicas_split_their_cpus():
    config = load_config(CONFIGS[0].parent / "tiny.yaml", {"vision.cpus": [4, 5, 6, 7], "vision.replicas": 2})
    assert [config.vision.cpus_of(i) for i in range(2)] == [(4, 5), (6, 7)]
    assert load_config(CONFIGS[0].parent / "tiny.yaml").vision.cpus_of(0) == ()


def test_colocated_on_a_two_gpu_config_names_the_fix():
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS[0].parent / "internvl3_5-8b.yaml", {"mode": "colocated"})
    assert "internvl3_5-8b.yaml" in str(info.value) and "set vision.device to it" in str(info.value)


def test_tls_files_are_checked_at_load(tmp_path, monkeypatch):
    pem = tmp_path / "server.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    unreadable = tmp_path / "unreadable.key"
    unreadable.write_text("")
    real_access = os.access  # root can read any file: the check is told that this one is unreadable
    monkeypatch.setattr(config_fields.os, "access", lambda path, mode: path != str(unreadable) and real_access(path, mode))
    cases = [
        ({"language.tls_cert": str(pem)}, "language.tls_cert: set without tls_key"),
        ({"language.tls_key": str(pem)}, "language.tls_key: set without tls_cert"),
        ({"language.tls_client_ca": str(pem)}, "language.tls_client_ca: mutual TLS needs tls_cert and tls_key"),
        ({"language.tls_cert": str(tmp_path / "absent.pem"), "language.tls_key": str(pem)},
         f"language.tls_cert: no such file: '{tmp_path / 'absent.pem'}'"),
        ({"language.tls_cert": str(pem), "language.tls_key": str(pem), "language.tls_client_ca": str(tmp_path)},
         f"language.tls_client_ca: not a file: '{tmp_path}'"),
    ]
    cases.append(({"language.tls_cert": str(pem), "language.tls_key": str(unreadable)},
                  f"language.tls_key: cannot read '{unreadable}'"))
    for override, expected in cases:
        with pytest.raises(ConfigError) as info:
            load_config(CONFIGS[0].parent / "tiny.yaml", override)
        assert expected in str(info.value) and "tiny.yaml" in str(info.value)
    tls = load_config(CONFIGS[0].parent / "tiny.yaml", {"language.tls_cert": str(pem), "language.tls_key": str(pem)})
    assert tls.language.tls_cert == str(pem)
