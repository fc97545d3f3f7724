"""The servers' operational surface: health, reflection, model info, Prometheus metrics."""

from __future__ import annotations

import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pipeline.client import message, sampling


def test_health_and_reflection(fp32_deployment):
    config = fp32_deployment.config
    for address in (fp32_deployment.address, f"{config.vision.host}:{config.vision.grpc_port}"):
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(fp32_deployment.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"dvd.v1.Generation", "dvd.v1.Admin", "grpc.health.v1.Health"} <= services


def test_model_info(fp32_deployment, client_for):
    info = client_for(fp32_deployment).model_info()
    assert (info.model, info.checkpoint_format, info.llm_architecture) == ("tiny", "hf", "Qwen3ForCausalLM")
    assert info.tokens_per_tile == 256 and info.mode == "decoupled"
    assert list(info.vision_servers) == [f"127.0.0.1:{fp32_deployment.config.vision.job_port}"]


def test_metrics_count_requests_and_latencies(fp32_deployment, client_for):
    config = fp32_deployment.config
    before = _scrape(config.language.host, config.language.metrics_port)
    client_for(fp32_deployment).generate([message("user", "hi")], sampling(max_new_tokens=3))
    language = _scrape(config.language.host, config.language.metrics_port)
    vision = _scrape(config.vision.host, config.vision.metrics_port)
    for name in ("dvd_time_to_first_token_seconds_count", "dvd_e2e_latency_seconds_count", "dvd_running_requests"):
        assert name in language
    for series, added in (
        ('dvd_requests_total{outcome="ok"}', 1),
        ("dvd_completion_tokens_total", 3),
        ("dvd_e2e_latency_seconds_count", 1),
    ):
        assert _value(language, series) - _value(before, series) == added, series
    assert "dvd_vision_encode_ms_count" in vision and "dvd_vision_queue_depth" in vision


def _scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _value(text: str, series: str) -> float:
    """A series' value; 0 for a labelled series not created yet."""
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)
